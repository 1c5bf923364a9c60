"""Pure merge math and safetensors I/O.

Importing the package (before torch) makes idle OpenMP threads sleep instead of spin: a merge overlaps
torch's arithmetic with a reader and a writer thread, and spinning workers took the cores those need
(the 1B linear merge of bench/merge_bench.py: 11.1 s spinning, 7.8 s sleeping). An explicit
OMP_WAIT_POLICY in the environment wins.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
