import os
import sys

import torch

# Kernels run compiled on a GPU; without one, through Triton's interpreter, which reads this
# variable when triton is first imported, so it is set before anything imports triton.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# bench/ holds the pure-Python packing oracle that the tests share with the benchmarks.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
