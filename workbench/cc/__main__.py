"""``python -m workbench.cc --include``: print the directory of workbench_kernel.h."""
import argparse

from .compiler import include_path

parser = argparse.ArgumentParser(prog="python -m workbench.cc")
parser.add_argument("--include", action="store_true", help="print the kernel header's directory")
args = parser.parse_args()
if args.include:
    print(include_path())
else:
    parser.print_help()
