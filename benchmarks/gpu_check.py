"""The GPU check on a CUDA machine (workflows/gpu_check.py does the measuring) into
benchmarks/results/gpu.md:

    python -m benchmarks.gpu_check                 # on a CUDA machine (needs torch, torchvision, timm)
    python -m benchmarks.gpu_check --smoke --out /tmp/gpu.md   # tiny sizes on CPU
"""
import sys

from workflows.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
