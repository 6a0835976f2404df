"""`tilec profile [-o FILE] [--peer HOST:PORT] [--serve PORT]`: measure this machine."""


def add_parser(sub, common):
    p = sub.add_parser("profile", help="measure this machine's kernels and link; write a device profile (JSON)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="profile file (default: the cache used for --devices N, ~/.cache/tilec/profile-local.json)")
    p.add_argument("--peer", metavar="HOST:PORT", help="measure the link to a peer running `tilec profile --serve`")
    p.add_argument("--serve", type=int, metavar="PORT", help="answer link tests from peers on PORT (until Ctrl-C)")
    p.add_argument("--quick", action="store_true", help="fewer shapes, shorter timings (a few seconds)")
    p.add_argument("--name", help="the profile's name (default: local-HOSTNAME)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")


def run(args):
    from tilec import profile_measure as linktest
    if args.serve is not None:
        print(f"answering link tests on port {args.serve} (Ctrl-C to stop)", flush=True)
        linktest.serve(args.serve)
        return 0
    from tilec.profile_measure import measure_profile, write_profile
    from tilec.cluster import local_profile_path
    from tilec.profiles import profile_from_dict
    peer = linktest.parse_peer(args.peer) if args.peer else None
    data = measure_profile(quick=args.quick, peer=peer, dtype=args.dtype, name=args.name)
    path = write_profile(data, args.output or local_profile_path())
    prof = profile_from_dict(data, str(path))
    from tilec.cost.compute import reference_rate
    one, board = reference_rate(prof), reference_rate(prof, prof.cores)
    print(f"{data['name']}: {data['cores']} cores, {data['memory_mb']} MB usable; a 64-channel 3x3 conv (forward + "
          f"backward) at {one / 1e9:.2f} GFLOP/s on one core, {board / 1e9:.2f} on {prof.cores} "
          f"({board / one:.2f}x)")
    print("threads: " + ", ".join(f"{k} {'/'.join(f'{v:.2f}' for v in t)}" for k, t in data["threads"].items()))
    print(f"link: {data['link']['bandwidth_mbps']:.1f} Mbit/s, {data['link']['latency_ms']:.3f} ms "
          f"({data['sources']['link']})")
    if "cpu_us_per_message" in data["link"]:
        print(f"messages: {data['link']['cpu_us_per_message']:.0f} us + {data['link']['cpu_ns_per_byte']:.2f} ns a byte "
              f"of CPU at each end (what they take from the kernels where those take every core)")
    if "jitter" in data:
        print(f"jitter: a kernel call's time varies by {data['jitter']:.1%} from step to step on two workers side "
              f"by side (calls of {data.get('jitter_call_ms', 0):.1f} ms; what the faster waits for at every barrier)")
    worst = data["sources"]["fit_worst_relative_error"]
    noise = data["sources"]["noise_median_over_best"]
    print("fit, worst relative error per kernel: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in worst.items()))
    print("noise, median over best timing: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in noise.items()))
    print(f"wrote {path}")
    warning = busy_warning(noise)
    if warning:
        print(warning)
    return 0


BUSY_NOISE = 0.10  # the convolutions' median over best timing above which a profile is suspect


def busy_warning(noise, limit=BUSY_NOISE):
    """A warning where the convolutions' timings varied more than ``limit``
    between repeats (``noise``: kind.direction -> median over best - 1):
    something else ran meanwhile, and its predictions may be off as much.
    Measured here: a profile with conv.backward at 13% (epilogue.backward
    18%) predicted steps 13-37% long; one taken minutes later at 4% and 2%,
    -2..+8%."""
    busy = {k: v for k, v in noise.items() if k.startswith("conv.") and v > limit}
    if not busy:
        return None
    worst = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(busy.items()))
    return (f"warning: the machine was busy while this ran (timings of the same call varied: {worst}); the "
            f"predictions of plans made with this profile may be off by as much: run `tilec profile` again in a "
            f"quieter moment")
