"""The harness's evaluation loop with its per-call preparation done once, for a model scored again and again.

A search scores one loaded model many times as its weights change. What does not depend on the weights is prepared
when the evaluator is made, by lm-eval's own code, and reused by every call:

- each task's requests (``Task.build_all_requests``: documents, prompts, few-shot contexts) and its documents;
- for greedy generation, the batches exactly as the harness's HF wrapper (``HFLM.generate_until``) makes them: the
  same sort, batch size, tokenisation, left padding and truncation.

Each call then runs what depends on the weights, in the order ``lm_eval.evaluator.evaluate`` runs it: the model on
the requests; the tasks' filters and ``process_results``; the harness's aggregation
(lm_eval_private.aggregate, whose results dict is what ``evaluate`` returns). Log-likelihood
requests go through the wrapper's own methods; greedy generation goes through ``GreedyGeneration`` below.
``process_results`` is called once per distinct (document, generated text): it is a function of the two, and a
search sees the same answers again and again.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from dppa.errors import DppaError
from dppa.evaluation.lm_eval_private import aggregate, harness_generate, metric_names

log = logging.getLogger(__name__)
MEMO_LIMIT = 200_000  # entries per memo; a memo past it is emptied (it only saves repeated work)

# Generation settings that leave HF's greedy decoding as the loop below does it: token ids the loop reads, what
# generate returns besides tokens, bookkeeping (use_cache: the first-batch check compares the loop with generate).
NEUTRAL_GENERATION_CONFIG = {
    *("bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "output_attentions", "output_hidden_states"),
    *("_from_model_config", "transformers_version"),
}


class PreparedEvaluation:
    """The requests of ``task_dict``'s tasks built once for the harness's model wrapper ``lm``; ``results()`` runs
    them on the model's current weights and returns the harness's results dict.

    ``repeated=False`` for a single evaluation: generation then stays with the harness (``GreedyGeneration``'s
    check would cost two batches and gain nothing) and the harness's progress bars show."""

    def __init__(self, lm, task_dict: dict, limit: int | float | None, *, repeated: bool = True):
        from lm_eval.evaluator_utils import get_sample_size

        self.lm = lm
        self.tasks = task_dict["tasks"]
        self.groups = task_dict.get("groups", {})
        for name, task in self.tasks.items():
            if getattr(task, "UNSAFE_CODE", False) or getattr(task, "MULTIMODAL", False):
                raise DppaError(f"task {name}: runs model-written code or needs images; dppa evaluates neither")
            if "bypass" in metric_names(task):
                raise DppaError(f"task {name}: has no metric (bypass); give a task that scores its answers")
        self.requests: dict[str, list] = defaultdict(list)  # request type -> instances, in task order
        self.docs: dict[str, list] = {}  # task -> [(doc_id, doc, its instances in request order)]
        for name, task in self.tasks.items():
            task_limit = get_sample_size(task, limit)
            task.build_all_requests(limit=task_limit, rank=lm.rank, world_size=lm.world_size)
            by_doc = defaultdict(list)
            for instance in task.instances:
                self.requests[instance.request_type].append(instance)
                by_doc[instance.doc_id].append(instance)
            for instances in by_doc.values():
                instances.sort(key=lambda x: x.idx)
            self.docs[name] = [
                (doc_id, doc, by_doc[doc_id])
                for doc_id, doc in task.doc_iterator(rank=lm.rank, limit=task_limit, world_size=lm.world_size)
            ]
        # each instance once per repeat, as the harness sends them to the model
        self.sent = {kind: [i for i in insts for _ in range(i.repeats)] for kind, insts in self.requests.items()}
        self.progress = not repeated
        self.generation = GreedyGeneration.prepare(lm, self.sent.get("generate_until", [])) if repeated else None
        # only the harness's own generation may sample; everything else here is deterministic
        self.uses_rng = bool(self.sent.get("generate_until")) and self.generation is None
        self._metrics: dict = {}

    def results(self) -> dict:
        """The harness's results dict (as ``lm_eval.evaluator.evaluate`` returns it, without samples)."""
        for instances in self.requests.values():
            for instance in instances:
                instance.resps = []
                instance.filtered_resps = {}
        for kind, sent in self.sent.items():
            if kind == "generate_until" and self.generation is not None:
                outputs = self.generation.run()
            else:
                outputs = getattr(self.lm, kind)(sent, disable_tqdm=not self.progress)
            for output, instance in zip(outputs, sent, strict=True):
                instance.resps.append(output)
        accumulated = {}
        for name, task in self.tasks.items():
            task.apply_filters()
            raw = defaultdict(list)
            for filter_key in task.instances[0].filtered_resps:
                for doc_id, doc, instances in self.docs[name]:
                    answers = [instance.filtered_resps[filter_key] for instance in instances]
                    for metric, value in self._process(name, task, doc_id, doc, filter_key, answers).items():
                        raw[(metric, filter_key)].append(value)
            accumulated[name] = {"task": task, "raw_metrics": raw, "logged_samples": []}
        return aggregate(accumulated, self.groups)

    def _process(self, name, task, doc_id, doc, filter_key, answers) -> dict:
        if not all(isinstance(a, str) for a in answers):  # log-likelihoods: new floats every call
            return task.process_results(doc, answers)
        key = (name, doc_id, filter_key, tuple(answers))
        metrics = self._metrics.get(key)
        if metrics is None:
            if len(self._metrics) >= MEMO_LIMIT:
                self._metrics.clear()
            metrics = self._metrics[key] = task.process_results(doc, answers)
        return metrics


@dataclass
class _Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    until: list[str]
    max_length: int
    kwargs: dict  # what the harness passes on to HF's generate besides the above
    lookback: list[int]  # per stop string: how many last generated tokens the harness decodes to look for it
    texts: dict = field(default_factory=dict)  # generated tokens -> the harness's answer text

    def __post_init__(self):
        mask = self.attention_mask
        # generate numbers positions from the mask (padding does not move a prompt), and drops a mask of ones
        self.positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        self.padded = bool((mask == 0).any())
        self.ones = mask.new_ones((mask.shape[0], 1))  # the mask's column for each generated token


class GreedyGeneration:
    """Greedy generation of prebuilt batches, equal to what ``HFLM.generate_until`` returns for them.

    On a small model HF's ``generate`` spends a tenth of its time outside the model (logits processors, criteria,
    lm-eval's stop check that decodes the whole batch every step). This loop feeds the model what ``generate``
    feeds it (the left-padded prompts with their mask, then one token per step with the grown mask and the key/value
    cache), takes the argmax of the last logits, pads rows that ended with EOS, and stops exactly where
    ``generate`` with lm-eval's stop criteria stops: at the maximum length, when every row has ended, or when every
    row has shown one stop string in the decoded last few tokens (decodings are remembered). The answers are then
    cut as the harness cuts them. ``prepare`` checks this against the harness on the first batch (bitwise equal
    logits at every step, equal tokens) and returns None, so the harness generates, on any difference.
    """

    def __init__(self, lm, requests: list):
        from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs

        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        collator = Collator(
            [r.args for r in requests],
            sort_fn=lambda req: (-len(lm.tok_encode(req[0])), req[0]),
            group_by="gen_kwargs",
            group_fn=lambda x: x[1],
        )
        eos_text = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
        self.batches: list[_Batch] = []
        for chunk in collator.get_batched(n=lm.batch_size):
            contexts, all_kwargs = zip(*chunk, strict=True)
            kwargs = normalize_gen_kwargs(copy.deepcopy(all_kwargs[0]), lm.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = kwargs.pop("max_gen_toks")
            input_ids, attention_mask = lm.tok_batch_encode(
                contexts, left_truncate_len=lm.max_length - max_gen_toks, truncation=lm.truncation
            )
            max_length = kwargs.pop("max_length", input_ids.shape[1] + max_gen_toks)
            lookback = [len(self.tokenizer.encode(s, add_special_tokens=False)) + 2 for s in until]
            self.batches.append(
                _Batch(input_ids.to(lm.device), attention_mask.to(lm.device), until, max_length, kwargs, lookback)
            )
        self.order = collator.get_original(list(range(len(requests))))  # request -> its place in batch order
        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos = frozenset(eos)
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None or not eos else eos[0]  # generate's choice when the tokenizer has none
        self.think_end_token = lm.think_end_token if isinstance(lm.think_end_token, str) else None
        parameters = inspect.signature(self.model.forward).parameters
        self.cache_name = "cache" if "cache" in parameters else "past_key_values"
        self.with_positions = "position_ids" in parameters
        # generate asks for the last position's logits only where the model allows it (a smaller head product,
        # whose float sums can differ in the last bit from the full one's)
        self.model_kwargs = {"use_cache": True, "return_dict": True}
        if "logits_to_keep" in parameters:
            self.model_kwargs["logits_to_keep"] = 1
        self._windows: dict[tuple[int, ...], str] = {}

    @classmethod
    def prepare(cls, lm, requests: list) -> GreedyGeneration | None:
        """The loop for ``requests`` (generate_until instances), or None where the harness must generate them."""
        if not requests:
            return None
        why = cls._unsupported(lm)
        generation = None
        if why is None:
            generation = cls(lm, requests)
            why = next((f"generation settings {b.kwargs}" for b in generation.batches if not _greedy(b.kwargs)), None)
        if why is None:
            why = generation.check()
        if why is not None:
            log.warning("generation runs through the harness's generate (slower): %s", why)
            return None
        return generation

    @staticmethod
    def _unsupported(lm) -> str | None:
        config = getattr(lm.model, "config", None)
        if getattr(lm, "backend", None) != "causal" or getattr(config, "is_encoder_decoder", True):
            return "not a decoder-only model"
        if not isinstance(lm.batch_size, int):
            return f"batch size {lm.batch_size!r}"
        if isinstance(lm.think_end_token, int) or lm.mixed_precision_dtype is not None:
            return "thinking-token or mixed-precision settings"
        from transformers import GenerationConfig

        default = GenerationConfig().to_dict()
        settings = lm.model.generation_config.to_dict().items()
        extra = {key for key, value in settings if default.get(key) != value} - NEUTRAL_GENERATION_CONFIG
        if extra:
            return f"the model's generation config sets {', '.join(sorted(extra))}"
        return None

    def check(self) -> str | None:
        """None if the loop gives the harness's logits and tokens on the first batch, else what differs."""
        batch = self.batches[0]
        seen: list[torch.Tensor] = []
        hook = self.model.register_forward_hook(lambda _m, _a, out: seen.append(out.logits[:, -1].detach().clone()))
        try:
            with torch.no_grad():
                expected = harness_generate(
                    self.lm,
                    context=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    stop=list(batch.until),
                    max_length=batch.max_length,
                    **copy.deepcopy(batch.kwargs),
                )
            harness_logits, seen[:] = list(seen), []
            generated = torch.tensor(self._generate(batch), dtype=expected.dtype, device=expected.device)
            tokens = torch.cat([batch.input_ids, generated], dim=-1)
        finally:
            hook.remove()
        if not (tokens.shape == expected.shape and torch.equal(tokens, expected)):
            return "its tokens differ from HF generate's on the first batch"
        if len(seen) != len(harness_logits) or not all(map(torch.equal, seen, harness_logits)):
            return "its logits differ from HF generate's on the first batch"
        return None

    def run(self) -> list[str]:
        """The answer to each request (in request order) on the model's current weights."""
        from lm_eval.models.utils import postprocess_generated_text

        answers: list[str] = []
        for batch in self.batches:
            for tokens in self._generate(batch):
                key = tuple(tokens)
                text = batch.texts.get(key)
                if text is None:
                    if len(batch.texts) >= MEMO_LIMIT:
                        batch.texts.clear()
                    text = batch.texts[key] = postprocess_generated_text(
                        generation=self.lm.tok_decode(tokens), stop=batch.until, think_end_token=self.think_end_token
                    )
                answers.append(text)
        return [answers[i] for i in self.order]

    @torch.no_grad()
    def _generate(self, batch: _Batch) -> list[list[int]]:
        """Each row's generated tokens, as HF's greedy ``generate`` returns them with lm-eval's stop criteria."""
        tokens, positions = batch.input_ids, batch.positions
        mask = batch.attention_mask if batch.padded else None
        rows, prompt = tokens.shape
        inputs = {"input_ids": tokens}
        if self.with_positions:
            inputs["position_ids"] = positions
        if mask is not None:
            inputs["attention_mask"] = mask
        generated: list[list[int]] = [[] for _ in range(rows)]
        ended: list[int] = []  # rows that produced EOS: generate gives them the pad token from then on
        seen = [[False] * rows for _ in batch.until]  # per stop string, per row: seen in the decoded last tokens
        out = self.model(**inputs, **self.model_kwargs)
        while True:
            # the argmax of the logits is that of their float32 copy, which generate takes (the cast is exact)
            next_tokens = out.logits[:, -1].argmax(dim=-1)
            if ended:
                next_tokens[ended] = self.pad
            for row, token in zip(generated, next_tokens.tolist(), strict=True):
                row.append(token)
            if prompt + len(generated[0]) >= batch.max_length or self._stop_strings_seen(generated, batch, seen):
                break
            if self.eos:
                ended = [r for r, row in enumerate(generated) if r in ended or row[-1] in self.eos]
                if len(ended) == rows:
                    break
            inputs = {"input_ids": next_tokens[:, None], self.cache_name: getattr(out, self.cache_name)}
            if self.with_positions:
                positions = positions[:, -1:] + 1
                inputs["position_ids"] = positions
            if mask is not None:
                mask = torch.cat([mask, batch.ones], dim=-1)
                inputs["attention_mask"] = mask
            out = self.model(**inputs, **self.model_kwargs)
        return generated

    def _stop_strings_seen(self, generated: list[list[int]], batch: _Batch, seen: list[list[bool]]) -> bool:
        """lm-eval's criterion: a row latches a stop string once the decoded last (its length + 2) generated tokens
        contain it; generation ends when every row has latched the same stop string."""
        ended = False
        for stop, lookback, latched in zip(batch.until, batch.lookback, seen, strict=True):
            for row, done in enumerate(latched):
                if not done:
                    latched[row] = stop in self._decode(tuple(generated[row][-lookback:]))
            ended = ended or all(latched)
        return ended

    def _decode(self, window: tuple[int, ...]) -> str:
        text = self._windows.get(window)
        if text is None:
            if len(self._windows) >= MEMO_LIMIT:
                self._windows.clear()
            text = self._windows[window] = self.tokenizer.decode(list(window))
        return text


def _greedy(kwargs: dict) -> bool:
    """Whether HF's generate, given these settings as the harness passes them, decodes greedily and nothing else."""
    rest = dict(kwargs)
    temperature = rest.pop("temperature", 0.0)
    return temperature == 0.0 and rest.pop("do_sample", None) in (None, False) and not rest
