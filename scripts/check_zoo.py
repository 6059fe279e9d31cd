"""Check a zoo built by `dppa zoo` against the light / heavy targets; see dppa/zoo/check.py.

Usage: python scripts/check_zoo.py /tmp/zoo-light --regime light
"""

from dppa.zoo.check import main

if __name__ == "__main__":
    raise SystemExit(main())
