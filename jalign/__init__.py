import os

__version__ = "0.1.0"

# jalign uses transformers for tokenizers and configs only, never its PyTorch models; its
# import-time advice "PyTorch was not found. Models won't be available ..." would tell a
# user without torch (the normal install) that something is missing when nothing is.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
