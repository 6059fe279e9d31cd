"""`dppa init DIR`: a new pipeline project for your own models."""

from __future__ import annotations

from dppa.cli import add_command

ORDER = 2
HELP = "start a pipeline project for your own models (params.yaml, dvc.yaml, git + DVC)"

DESCRIPTION = """\
Create DIR as a pipeline project for your own models: params.yaml (dppa's own, with the models given here and
every other setting at its default, comments kept), dvc.yaml (the stage graph), .gitignore, .dvcignore, a short
README, and git and DVC repositories. It runs on the installed dppa: `pip install` of dppa, `dppa init`, then
`dppa run` in DIR is all it takes.

A model is a local folder (a model, or a PEFT LoRA adapter for a fine-tune) or a hub model ORG/NAME@REVISION
(a branch, tag or commit sha). Each fine-tune's --tasks (lm-eval task names of its domain) drive the factor and
merge-scale searches and the evaluation; without tasks, give fixed settings with --set (for example
--set amplify.factors=[1.8,1.0] --set merge.scale=0.5 --set merge.weights=null --set evaluate=null).
params.yaml is checked before anything is written.

examples:
  dppa init my-merge --base meta-llama/Llama-3.1-8B@main \\
      --finetune math=org/llama-math@v1 --finetune law=/models/llama-law-lora \\
      --tasks math=gsm8k --tasks law=my_law_task
  dppa init /tmp/p --base zoo/base --finetune arith=zoo/arith --tasks arith=zoo_arith --set evaluate.limit=20
  dppa init demo-real --zoo smollm2-135m --set zoo.regime=light   # the demo on a real LLM (make demo-real)
"""


def register(subparsers) -> None:
    p = add_command(subparsers, "init", HELP, DESCRIPTION, run)
    p.add_argument("folder", metavar="DIR", help="project folder to create (must not exist)")
    p.add_argument("--base", metavar="SOURCE", help="base model: a folder or ORG/NAME@REVISION")
    p.add_argument(
        "--zoo",
        metavar="SIZE",
        choices=["tiny", "default", "smollm2-135m"],
        help="instead of --base/--finetune: the zoo's models, built by the zoo stage at this size (smollm2-135m: "
        "the real pre-trained LLM; needs `make real-zoo-deps`)",
    )
    p.add_argument(
        "--finetune",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="a fine-tune (repeat for each): a model or LoRA adapter folder, or ORG/NAME@REVISION",
    )
    p.add_argument(
        "--tasks", action="append", default=[], metavar="NAME=T1,T2", help="lm-eval tasks of fine-tune NAME's domain"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a params.yaml setting, dotted key and a YAML value (e.g. prune.density=0.3); repeatable",
    )


def run(args) -> int:
    from dppa.pipeline.project import init_project

    folder = init_project(args.folder, args.base, args.finetune, args.tasks, args.set, zoo=args.zoo)
    print(f"{folder}: a new project; `cd {folder} && dppa run` runs it (params.yaml holds every setting)")
    return 0
