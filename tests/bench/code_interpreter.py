"""Code interpreter timings through the official SDK (e2b-code-interpreter), next to the
raw engine floor measured in the same run.

    eval "$(colima-e2b env)"      # a running server on the engine named below
    python3 tests/bench/code_interpreter.py --engine docker --n 5

Reports, as medians of --n: create (Sandbox.create() until it returns), the first
`1+1` after it (the default Python kernel warming), create-to-first-result (the sum), a
warm `1+1` round trip (median of 50), and the engine's own create+start of the same image
with `sleep` (CLI `run -d`, then `rm -f`), so the ratio is against this machine's floor.
"""

import argparse
import statistics
import subprocess
import time


def cli(engine):
    if engine == "podman":
        return ["podman", "--remote", "--url", "unix:///run/podman/podman.sock"]
    return ["docker"]


def engine_floor(engine, image, n):
    times = []
    for i in range(n):
        name = f"ci-bench-floor-{i}-{int(time.time() * 1000)}"
        started = time.monotonic()
        subprocess.run(
            cli(engine) + ["run", "-d", "--name", name, "--entrypoint", "sleep", image, "600"],
            check=True,
            capture_output=True,
        )
        times.append(time.monotonic() - started)
        subprocess.run(cli(engine) + ["rm", "-f", name], capture_output=True)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="docker", choices=["docker", "podman"])
    parser.add_argument("--n", type=int, default=5)
    args = parser.parse_args()

    from e2b_code_interpreter import Sandbox

    creates, firsts, round_trips, image = [], [], [], None
    for _ in range(args.n):
        started = time.monotonic()
        sandbox = Sandbox.create(timeout=300)
        created = time.monotonic()
        assert sandbox.run_code("1+1").text == "2"
        first = time.monotonic()
        creates.append(created - started)
        firsts.append(first - created)
        if not round_trips:
            for _ in range(50):
                t = time.monotonic()
                sandbox.run_code("1+1")
                round_trips.append(time.monotonic() - t)
            info = subprocess.run(
                cli(args.engine)
                + ["inspect", "--format", "{{.Config.Image}}", f"colima-e2b-{sandbox.sandbox_id}"],
                capture_output=True,
                text=True,
            )
            image = info.stdout.strip() or None
        sandbox.kill()
    floor = engine_floor(args.engine, image, args.n) if image else None
    ms = lambda s: f"{s * 1000:.0f} ms"
    total = statistics.median([c + f for c, f in zip(creates, firsts)])
    print(f"engine {args.engine}, median of {args.n}")
    print(f"create                         {ms(statistics.median(creates))}")
    print(f"first 1+1 after create         {ms(statistics.median(firsts))}")
    print(f"create-to-first-result         {ms(total)}")
    print(f"warm 1+1 round trip (50)       {statistics.median(round_trips) * 1000:.1f} ms")
    if floor:
        print(f"engine create+start ({image})  {ms(floor)}  (create-to-first-result: {total / floor:.2f}x)")


if __name__ == "__main__":
    main()
