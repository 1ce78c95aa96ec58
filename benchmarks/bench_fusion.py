"""Fusion throughput benchmark as a script: same as ``jacfusion-fed bench fusion``.

python benchmarks/bench_fusion.py --ks 10,100,309 --samples 10000
"""

from jacfusion_fed.cli import app

if __name__ == "__main__":
    app(["bench", "fusion", *__import__("sys").argv[1:]])
