"""Embedding the same images from local disk and from an S3-compatible server, side by side, in one run.

The server is moto's (``moto[server]``), started in its own process on 127.0.0.1 and reached over HTTP by the real
client (s3fs through fsspec), with the output written to the bucket too; so the S3 figure pays for the listing, one
ranged GET an image (or ranged reads of each tar), the plan read back from the bucket and a PUT a part. Same images
(photo-like JPEGs of 500x375, ``benchmarks/pipeline.py``'s), same model, same options, after a small warm-up run
that is not counted; each side runs twice, local / S3 / S3 / local, so that a change in the machine's load during
the benchmark weighs on both alike; the ratio is of the summed images/s. Also the time to read one image from each
place, one after another in this process (what the DataLoader workers pay, spread over them). Prints (and with
``-o`` writes) one JSON document.

    python benchmarks/storage.py --images 300 -o benchmarks/results/storage_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import ornis
from ornis.inference.batch import embed

sys.path.insert(0, str(Path(__file__).parent))
from pipeline import make_jpegs, make_tars  # noqa: E402 - the pipeline benchmark's images, beside this file

SERVER = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print("%s:%d" % server.get_host_and_port(), flush=True)
sys.stdin.read()  # until the benchmark closes our stdin
"""


def start_server() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in a process of its own (it would share this one's interpreter lock otherwise)."""
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    address = proc.stdout.readline().strip()
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://{address}",
        AWS_EC2_METADATA_DISABLED="true",
    )
    return proc, address


def upload(paths: list[Path], prefix: str) -> None:
    """Put each file under ``prefix`` (``bucket/folder``), by its name."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.pipe({f"{prefix}/{p.name}": p.read_bytes() for p in paths})


def read_ms(paths: list[Path]) -> dict:
    """Milliseconds to read one image: from local disk, and with one ranged GET as the batch runner does."""
    from ornis.data.decode import read_image_bytes

    times = {}
    for where, names in (("local", [str(p) for p in paths]), ("s3", [f"s3://bench/photos/{p.name}" for p in paths])):
        start = time.perf_counter()
        for name in names:
            read_image_bytes(name)
        times[f"read_one_image_{where}_ms"] = round(1000 * (time.perf_counter() - start) / len(names), 2)
    return times


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(inputs: list[str], out: str, checkpoint: Path, options: dict, server_pid: int) -> dict:
    """One run's figures, with the CPU time the S3 server spent meanwhile (it shares this machine's cores)."""
    before = cpu_seconds(server_pid)
    summary = embed(inputs, model=checkpoint, out=out, **options)
    return {
        "server_cpu_s": round(cpu_seconds(server_pid) - before, 2),
        "images_per_s": round(summary.images_per_s, 1),
        "steady_images_per_s": round(summary.done / summary.loop_s, 1) if summary.loop_s else 0.0,
        "wall_s": round(summary.wall_s, 2),
        "rows": summary.done,
        "errors": summary.errors,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_t16", help="architecture with random weights")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--per-tar", type=int, default=100, help="images a webdataset tar")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, help="DataLoader workers (default from the CPU count)")
    p.add_argument("-o", "--output", type=Path, help="also write the JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Make the images, put them in the bucket, embed them from both places, print the JSON."""
    args = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="ornis-storage-"))
    server, address = start_server()
    try:
        import s3fs

        paths = make_jpegs(scratch / "photos", args.images)
        tars = make_tars(paths, scratch / "tars", per_tar=args.per_tar)
        s3fs.S3FileSystem().mkdir("bench")
        t0 = time.perf_counter()
        upload(paths, "bench/photos")
        upload(tars, "bench/tars")
        upload_s = time.perf_counter() - t0
        torch.manual_seed(0)
        net = ornis.build_model(args.arch, num_classes=0, size=args.size)
        checkpoint = ornis.save_model(net, scratch / f"{args.arch}_bench.pt")
        options = {
            "device": "cpu",
            "batch_size": args.batch_size,
            "num_workers": args.workers,
            "progress": False,
            "shard_size": 100,
        }
        embed([str(p) for p in paths[:32]], model=checkpoint, out=scratch / "warmup", **options)
        load = [round(x, 2) for x in os.getloadavg()]
        sources = {
            "files": {"local": [str(scratch / "photos")], "s3": ["s3://bench/photos/"]},
            "tars": {"local": [str(t) for t in tars], "s3": ["s3://bench/tars/*.tar"]},
        }
        outs = {"local": str(scratch / "out"), "s3": "s3://bench/out"}
        runs: dict[str, list[dict]] = {}
        for kind, inputs in sources.items():
            # A B B A: a drift in the machine's load (other jobs on a shared machine) weighs on both sides alike
            for i, where in enumerate(("local", "s3", "s3", "local")):
                figures = timed(inputs[where], f"{outs[where]}-{kind}-{i}", checkpoint, options, server.pid)
                runs.setdefault(f"{kind}_{where}", []).append(figures)
        report = {
            "what": "ornis embed, the same images from local disk and from a local S3 server (moto, HTTP), "
            "output on the same side; each side run twice in the order local, s3, s3, local",
            "model": args.arch,
            "size": args.size,
            "images": args.images,
            "image_size": [500, 375],
            "per_tar": args.per_tar,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "device": platform.processor() or "cpu",
            "cpu_count": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_start": load,
            "server": f"moto on {address}",
            "upload_s": round(upload_s, 2),
            **read_ms(paths),
            **runs,
        }
        for kind in sources:
            local, remote = (sum(r["images_per_s"] for r in runs[f"{kind}_{w}"]) for w in ("local", "s3"))
            report[f"{kind}_s3_over_local"] = round(remote / local, 3)
        text = json.dumps(report, indent=2)
        print(text)
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text + "\n")
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
