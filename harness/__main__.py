"""``python -m harness``: the Hydra application of ``harness.cli``."""
from harness.cli import main

if __name__ == "__main__":
    main()
