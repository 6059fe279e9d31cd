"""Ship the base of a zoo built with `dppa zoo OUT --pretrain` as the pre-trained base of its size and seed.

Usage: python scripts/ship_zoo_base.py ZOO     (writes dppa/zoo/bases/SIZE-sSEED/; see dppa/zoo/shipped.py)
"""

import sys
from pathlib import Path

from dppa.zoo.shipped import ship_base

if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(ship_base(Path(sys.argv[1])))
