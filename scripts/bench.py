"""DCAL vs the plain ViT: speed, memory, FLOPs and data throughput (`python scripts/bench.py -h`)."""
import sys

from dcal_lib.bench import main

if __name__ == "__main__":
    sys.exit(main())
