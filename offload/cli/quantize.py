"""`offload quantize SRC DST --scheme int4|int8`: write a compressed-tensors `pack-quantized` copy of a 16/32-bit
checkpoint (the decoder layers' matrices packed per group; everything else, the config, tokenizer and generation
files as they are). transformers (with compressed-tensors), vLLM and `offload.load` read it.
"""
from __future__ import annotations

import sys

from .common import CommandError, UsageError, parser, run_command

PROG = "offload quantize"


def parse_args(argv):
    p = parser(PROG, __doc__.split("\n\n")[0])
    p.add_argument("src", metavar="SRC", help="a Hugging Face model folder of 16/32-bit safetensors, or a Hub name "
                   "(org/name: from the Hub cache, else downloaded)")
    p.add_argument("dst", metavar="DST", help="the new folder to write (must not exist, or be empty)")
    p.add_argument("--scheme", choices=["int4", "int8"], default="int4", help="bits per weight (default int4)")
    p.add_argument("--group-size", type=int, metavar="N", help="inputs per scale (default: the largest of "
                   "128/64/32 dividing every matrix's inputs)")
    p.add_argument("--asymmetric", action="store_true", help="an integer zero point per group (default: "
                   "symmetric, what vLLM's fastest kernels take)")
    args = p.parse_args(argv)
    if args.group_size is not None and args.group_size < 1:
        raise UsageError(f"--group-size must be >= 1, got {args.group_size}")
    return args


def _run(argv) -> int:
    args = parse_args(argv)
    import offload
    try:
        dst = offload.quantize(args.src, args.dst, args.scheme, args.group_size, symmetric=not args.asymmetric)
    except ValueError as error:                 # a GGUF or quantized source, an existing DST, a bad group
        raise CommandError(str(error).splitlines()[0]) from None
    print(f"wrote {dst} ({args.scheme}{'' if args.asymmetric else ', symmetric'}): load it with "
          f"offload chat {dst}")
    return 0


def main(argv=None) -> int:
    return run_command(PROG, _run, sys.argv[1:] if argv is None else argv)
