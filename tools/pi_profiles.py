#!/usr/bin/env python3
"""Derive the shipped Raspberry Pi profiles (tilec/profiles/rpi*.json) from cited measurements.

No Raspberry Pi is at hand, so the four shipped profiles are derived, reproducibly:

1. A *reference* profile of tilec's own kernels, measured on a known machine
   (``tilec.profile_measure.measure_profile()``, full, not quick), together
   with three scalar benchmarks of that same machine in the same run:
   single-core SGEMM (numpy float32 matmul 1024^3, BLAS on one thread, best of
   several), single-core memcpy (numpy ``copyto`` of a 64 MiB float32 array,
   bytes copied per second, best of several, like tinymembench's memcpy) and,
   when ``7z`` is installed, the 7-zip single-thread benchmark (``7z b
   -mmt=1``, the ``Tot:`` rating as sbc-bench reports it, taken at 100 % CPU
   usage: the R/U column, this machine being shared). These are cached
   in ``tools/pi_profiles_host.json`` (with the date and the machine), so a
   run without ``--measure`` reproduces the same profiles.

2. For every board, :data:`BOARDS` holds the same three figures and the
   rest of a profile, each with its source (URL and exact quote) and its
   status: ``measured`` (on that board), ``inference`` (computed from a
   measurement by a stated rule, e.g. fp32 = 2x fp64), ``derived``
   (arithmetic on cited numbers) or ``ASSUMED`` (no measurement found; the
   reason is given). The figures come from the research notes of issue 12
   (pi-profiles.md) and the sbc-bench result logs they cite.

3. The derivation, per kernel kind and direction (ref = the reference
   machine, board = the board)::

       r_gemm   = sgemm_ref / sgemm_board        (GFLOP/s, one core)
       r_mem    = memcpy_ref / memcpy_board      (MB/s, one core)
       r_scalar = 7zip_ref / 7zip_board          (7-zip single-thread rating)

       conv, connected (GEMM-bound):
           s_per_gflop = s_per_gflop_ref * r_gemm
           s_per_gb    = s_per_gb_ref    * r_mem
       epilogue, maxpool, elementwise (memory-bound; their "flops" are
       streaming element-wise work, so both terms follow the memory):
           s_per_gflop = s_per_gflop_ref * r_mem
           s_per_gb    = s_per_gb_ref    * r_mem
       every kind:
           overhead_us = overhead_us_ref * r_scalar   (Python/numpy call cost)

   Coefficients are rounded to 3 significant figures.

   Threads: ``threads.conv`` is the whole-CNN speed-up measured on the board
   (ncnn's yolov4-tiny, 1 and 4 threads), interpolated to 2 and 3 threads by
   Amdahl's law through those two points. The board's published GEMM/HPL
   thread scaling (``gemm_threads``) was the first choice and stays in the
   sources as an upper bound: with it, one board ran yolov2-tiny 2.5-3.1x
   faster than one of its cores, outside the public whole-CNN evidence
   (1.26-2.11x); the reasons are in ``CONV_THREADS_WHY`` and ``--validate``
   prints both. Epilogue, maxpool and elementwise follow the memory-bound
   scaling (Pi 5 STREAM read 1/2/4 threads, the only multi-core bandwidth
   measurement of a Pi found; ASSUMED for the other boards);
   ``threads.connected`` is [1.0] (the runtime keeps BLAS single-threaded
   there). ``sustained`` assumes an active cooler (fan) on every board; the
   passive-cooling figures are in each profile's ``sources`` so that a user
   can lower it.

   A known limit of scaling the memory-bound kinds by the DRAM memcpy
   ratio: the reference kernels are timed on arrays of a few MB. Here the
   epilogue forward stays in the 32 MB L3 (it streams about 1.8x the
   traffic of this machine's 64 MiB copy), so on a Pi, where those arrays
   come from DRAM, that term comes out up to ~1.8x too fast; the epilogue
   backward, max-pool and update stream below this machine's DRAM rate
   (compute-limited here), so on a Pi they may come out too slow. Together
   these kinds are ~4 % of a one-core yolov2-tiny step, so they are left as
   specified and reported (the host file records the 4 MiB copy rate too).

4. ``--validate`` compiles yolov2-tiny (batch 1) for a one-device cluster of
   each board, simulates it (``tilec simulate --json``) and checks that one
   board on all its cores is 1.4x-2.2x faster than one of its cores (the
   public whole-CNN 4-thread/1-thread evidence is 1.26x-2.11x) and, for the
   Pi 3 B, that the simulated step lies in the range the public Tiny-YOLO
   timings imply (:func:`pi3_public_range`).

Usage (from the repository root, with tilec installed)::

    python tools/pi_profiles.py --measure    # measure this machine, cache it, derive, write the profiles
    python tools/pi_profiles.py              # derive from the cached measurements, write the profiles
    python tools/pi_profiles.py --check      # exit 1 if the shipped profiles differ from the derivation
    python tools/pi_profiles.py --validate   # also compile + simulate yolov2-tiny on one board of each kind
"""
import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tilec_runtime.files import atomic_json, atomic_write

ROOT = Path(__file__).resolve().parent.parent
HOST_FILE = Path(__file__).resolve().parent / "pi_profiles_host.json"
PROFILES_DIR = ROOT / "tilec" / "profiles"
GEMM_KINDS = ("conv", "connected")
SIG = 3  # significant figures of the written coefficients

# -- sources -------------------------------------------------------------------
SBCB_COMMIT = "53f795176f2876cffac8cfd93395ee01e031f6ee"
SBCB = f"https://github.com/ThomasKaiser/sbc-bench/blob/{SBCB_COMMIT}/Results.md"


def sbcb_log(name):
    return f"https://github.com/ThomasKaiser/sbc-bench/blob/{SBCB_COMMIT}/results/{name}.txt"


def sbcb_row(log, row, memcpy, seven, tot, memcpy_note, seven_note):
    """memcpy_mbps and sevenzip_single of a board from one row of sbc-bench's Results.md (columns: 7-zip
    multi, 7-zip single, AES, memcpy, memset; memcpy is tinymembench on one core, MB/s; the 7-zip single
    rating is the ``Tot:`` line of ``7za b -mmt=1``, quoted from the log)."""
    return {"memcpy_mbps": fig(memcpy, "measured", sbcb_log(log), row, memcpy_note),
            "sevenzip_single": fig(seven, "measured", sbcb_log(log), f"{row} / log: \"{tot}\"", seven_note)}


MEMORY_MARGIN = 0.10  # ASSUMED: the page cache of the training data, logs, an ssh session


def usable_memory(log, free_line, available_mib, context):
    """memory_mb from an idle board's ``free`` (an sbc-bench log): what is available, less MEMORY_MARGIN,
    rounded to 50 MB."""
    mb = available_mib * 1.048576
    value = int(round(mb * (1 - MEMORY_MARGIN) / 50) * 50)
    return fig(value, "derived", sbcb_log(log), f"free: \"{free_line}\"",
               f"{context} An idle system (sbc-bench run) leaves {available_mib:g} MiB = {mb:.0f} MB available; "
               f"less a {MEMORY_MARGIN:.0%} margin (ASSUMED: page cache of the training data, logs, an ssh "
               f"session) = {mb * (1 - MEMORY_MARGIN):.0f} MB, rounded to {value} MB.")


OB2413 = "https://github.com/OpenMathLib/OpenBLAS/issues/2413"
OB2230 = "https://github.com/OpenMathLib/OpenBLAS/issues/2230"
OB2643 = "https://github.com/OpenMathLib/OpenBLAS/pull/2643"
OB4581 = "https://github.com/OpenMathLib/OpenBLAS/issues/4581"
BLIS754 = "https://github.com/flame/blis/issues/754"
SBCR = ("https://github.com/geerlingguy/sbc-reviews/blob/968b675e2f81da7ea2d32d81e4b8a904b42b13f3/"
        "web/data/results.yml")
FREQDOC = "https://www.raspberrypi.org/documentation/hardware/raspberrypi/frequency-management.md"
MEMDOC = "https://www.raspberrypi.org/documentation/configuration/config-txt/memory.md"
JG_GBE = "https://www.jeffgeerling.com/blogs/jeff-geerling/getting-gigabit-networking"
LINUX1337 = "https://github.com/raspberrypi/linux/issues/1337"
FW1014 = "https://github.com/raspberrypi/firmware/issues/1014"
NETBOX3175 = "https://github.com/netbox-community/devicetype-library/pull/3175"
LLAMA_STREAM = "https://github.com/ggml-org/llama.cpp/discussions/26484"
ARXIV_COOLING = "https://ar5iv.arxiv.org/html/2010.06291"
PHORONIX5 = "https://www.phoronix.com/review/raspberry-pi-5-benchmarks/2"
NCNN = ("https://github.com/Tencent/ncnn/blob/a4d2ea1d4422c9e849f166fd7a4aefb52f942f6a/benchmark/README.md")
NNPACK = "https://github.com/shizukachan/darknet-nnpack/blob/master/README.md"


def fig(value, status, source, quote="", note=""):
    """One board figure: its value, how it was obtained, where from."""
    assert status in ("spec", "measured", "inference", "derived", "ASSUMED"), status
    return {"value": value, "status": status, "source": source, "quote": quote, "note": note}


# The Pi 5 STREAM read scaling (1, 2, 4 threads measured; 3 interpolated):
# the only multi-core memory-bandwidth measurement of a Pi that was found.
PI5_STREAM = (9.26, 13.23, 11.59)
PI5_MEM_THREADS = [1.0, round(PI5_STREAM[1] / PI5_STREAM[0], 2),
                   round((PI5_STREAM[1] + PI5_STREAM[2]) / 2 / PI5_STREAM[0], 2), round(PI5_STREAM[2] / PI5_STREAM[0], 2)]
PI5_STREAM_QUOTE = ("| 1       |           9.26 | / | 2       |          13.23 | / | 4       |          11.59 | "
                    "(STREAM read-only GB/s, 240 MB arrays, throttled=0x0)")
MEM_THREADS_ASSUMED = fig(
    PI5_MEM_THREADS, "ASSUMED", LLAMA_STREAM, PI5_STREAM_QUOTE,
    "No multi-core memory-bandwidth measurement of this board exists in the sources (tinymembench, used by "
    "sbc-bench, is single-threaded). Assumed: the shape of the only measured Pi curve, the Pi 5's STREAM read "
    "(1.43x on 2 threads, 1.25x on 4; 3 threads interpolated), i.e. DRAM saturates at about two cores. An older "
    "in-order or narrower core reaches a smaller share of its DRAM bandwidth alone, so its real curve may be "
    "somewhat steeper; this assumption errs towards less multi-core gain.")

# DGEMM thread scaling of the A53 (Pi 3 B+, OpenBLAS, 1000^3): 1.986 / 3.853 / 5.388 GFLOP/s on 1/2/3
# threads; 4 threads rebooted the board. The 4-thread point is extrapolated with the 4/3-thread ratio of the
# only complete 1..4-thread GEMM scaling of a 4-core Pi found with a working BLAS (Pi 4, BLIS, OpenMP: 12.1 -> 14.2).
A53_DGEMM = (1.985864616, 3.852807348, 5.388351999)
PI4_BLIS_OMP = (4.6, 8.6, 12.1, 14.2)
A53_GEMM_THREADS = [1.0, round(A53_DGEMM[1] / A53_DGEMM[0], 2), round(A53_DGEMM[2] / A53_DGEMM[0], 2),
                    round(A53_DGEMM[2] / A53_DGEMM[0] * PI4_BLIS_OMP[3] / PI4_BLIS_OMP[2], 2)]
A53_DGEMM_QUOTE = ("OPENBLAS_NUM_THREADS=1: \"1000x1000x1000  1.007118 s      1985.864616 MFLOPS\"; =2: \"1000x1000x1000  "
                   "0.519102 s      3852.807348 MFLOPS\"; =3: \"1000x1000x1000  0.371171 s      5388.351999 MFLOPS\"; "
                   "=4: \"crash and reboot.\" (Pi 3 B+, OpenBLAS built TARGET=ARMV7)")
PI4_BLIS_QUOTE = ("Blis-0.5.1 \"N    MPI    OpenMP / 1    4.6    4.6 / 2    8.3    8.6 / 3    11.1   12.1 / "
                  "4    12.4   14.2\" (HPL, Pi 4 at 1.5 GHz)")



def amdahl(s4, cores=4):
    """Speed-ups on 1..cores threads of Amdahl's law through a measured ``cores``-thread speed-up ``s4``."""
    p = (1 - 1 / s4) / (1 - 1 / cores)
    return [round(1 / ((1 - p) + p / t), 2) for t in range(1, cores + 1)]


# Whole-CNN thread scaling of conv on the boards themselves: ncnn's yolov4-tiny (416x416, 6.9 GFLOP, 3x3
# convolutions + leaky + max-pool like yolov2-tiny) on 1 and 4 threads (avg ms), NCNN benchmark/README.md.
# Why this and not HPL for threads.conv: see CONV_THREADS_WHY.
NCNN_YOLOV4_TINY = {"rpi3bplus": (676.14, 417.17), "rpi4": (372.99, 207.22), "rpi5": (68.02, 46.29)}
NCNN_QUOTE = {
    "rpi3bplus": "section \"Raspberry Pi 3 Model B+ ... (1.4GHz x 4)\": \"yolov4-tiny  min =  675.33  max =  676.83  "
                 "avg =  676.14\" (1 thread) / \"yolov4-tiny  min =  410.25  max =  422.18  avg =  417.17\" (4 threads)",
    "rpi4": "section \"Raspberry Pi 4 Model B ... (1.8GHz x 4)\": yolov4-tiny \"avg =  372.99\" (1 thread) / "
            "\"avg =  207.22\" (4 threads)",
    "rpi5": "section \"Raspberry Pi 5 Broadcom BCM2712, Cortex-A76 (ARMv8) (2.4GHz x 4)\": yolov4-tiny \"avg =   "
            "68.02\" (1 thread) / \"avg =   46.29\" (4 threads)",
}
CONV_THREADS_WHY = (
    "threads.conv is the whole-CNN 4-thread speed-up measured on the board (ncnn, yolov4-tiny, the public model "
    "closest to yolov2-tiny), interpolated to 2 and 3 threads by Amdahl's law through the 1- and 4-thread points. "
    "The GEMM/HPL scaling (gemm_threads, kept in the sources as an upper bound) was the first choice; with it a "
    "one-board yolov2-tiny step came out 2.5-3.1x faster than one core, outside the public whole-CNN evidence "
    "(1.26-2.11x 4-thread/1-thread over all fp32 ncnn models on these boards). Evidence that this is the "
    "boards, not the library: in the same ncnn benchmark table the same Cortex-A53 cores scale 1.78-3.31x on a "
    "Snapdragon 410 phone SoC (section \"Qualcomm MSM8916 Snapdragon 410 (Cortex-A53 1.2GHz x 4)\") but 1.26-2.01x "
    "on the Pi 3 B+; HPL's large, cache-blocked GEMMs do not see the Pi's memory "
    "system the way a CNN's layers (weights streamed from DRAM, im2col bands, small late maps) do. ncnn runs "
    "Winograd kernels, which move more bytes per FLOP than tilec's im2col + GEMM, so tilec's own conv may scale "
    "somewhat better: `tilec profile` on the board measures it.")


def cnn_threads(board):
    one, four = NCNN_YOLOV4_TINY[board]
    return amdahl(one / four)


# No Pi-to-Pi ping/RTT was found for any board (research gap 3): the one-way latencies are ASSUMED.
LATENCY_USB_NIC = fig(
    0.3, "ASSUMED", "", "",
    "No Pi-to-Pi ping/RTT was found for any board. Assumed 0.3 ms one-way: the NIC sits on USB 2.0 (bulk "
    "transfers scheduled per 125 us microframe, at both ends) plus the Python socket send/receive on an A53.")
LATENCY_NATIVE_GBE = fig(
    0.15, "ASSUMED", "", "",
    "No Pi-to-Pi ping/RTT was found for any board. Assumed 0.15 ms one-way: a native Gigabit NIC (no USB hop) "
    "plus the Python socket send/receive on an A72/A76 core.")

BOARDS = {
    "rpi3b": {
        "description": "Raspberry Pi 3 Model B: BCM2837, 4x Cortex-A53 at 1.2 GHz, 1 GB LPDDR2, 10/100 Ethernet "
                       "(on the USB 2.0 hub); with a fan",
        "cores": fig(4, "spec", "Raspberry Pi 3 Model B product brief", "", "4x Cortex-A53 at 1.2 GHz"),
        "sgemm_gflops": fig(
            round(2 * A53_DGEMM[0] * 1.2 / 1.4, 3), "inference", OB2413, A53_DGEMM_QUOTE.split(";")[0],
            "No SGEMM or DGEMM measurement of a Pi 3 B exists in the sources. Inference: the Pi 3 B+ (same "
            "Cortex-A53 core, 1.4 GHz) single-core DGEMM 1.986 GFLOP/s, x2 for fp32 (a NEON register holds "
            "twice the fp32 lanes), x1.2/1.4 for the Pi 3 B's clock = 3.40 GFLOP/s. That build was 32-bit "
            "ARMV7; an A53 proxy (RK3399 little core, aarch64, clock not stated) measured 6.41 GFLOP/s SGEMM "
            f"({OB2643}: \"M=1024, N=1024, K=1024 :     5334.58 MFlops   6412.72 MFlops\"), so 64-bit "
            "OpenBLAS may be up to ~1.6x faster than assumed here."),
        **sbcb_row("4hOp", "| [Raspberry Pi 3 B (BCM2837)](results/4hOP.txt) | 1200 MHz | 5.15 | Raspbian Sid | "
                           "2970 | 977 | 36230 | 1110 | 1700 | 2.89 |", 1110, 977, "Tot:             100    977    977",
                   "the only Pi 3 B row", "p7zip 16.02, 32-bit build"),
        "gemm_threads": fig(
            A53_GEMM_THREADS, "derived", OB2413, A53_DGEMM_QUOTE,
            "Same Cortex-A53 core as the Pi 3 B+: its DGEMM scaling (2 threads 1.94x, 3 threads 2.71x). "
            "4 threads: ASSUMED (the board rebooted): 2.71 x 14.2/12.1 (the 4-over-3-thread gain of the Pi 4's "
            f"complete BLIS run, {OB2230}: {PI4_BLIS_QUOTE}) = 3.18."),
        "cnn_threads": fig(
            cnn_threads("rpi3bplus"), "derived", NCNN, NCNN_QUOTE["rpi3bplus"],
            'No 1-thread ncnn run of a Pi 3 B exists; the Pi 3 B+ (same Cortex-A53 cores, LPDDR2) is used: 676.14/417.17 = 1.62x on 4 threads (ASSUMED equal on the 1.2 GHz board). ' + CONV_THREADS_WHY),
        "memory_threads": MEM_THREADS_ASSUMED,
        "bandwidth_mbps": fig(
            94, "derived", NETBOX3175,
            "ethtool on a 3B: \"Supported link modes:   10baseT/Half 10baseT/Full 100baseT/Half 100baseT/Full\"",
            "10/100 Ethernet only. No Pi-to-Pi iperf of a Pi 3 B was found; 94 Mbit/s is derived from the "
            "100 Mbit/s line rate: TCP payload per full-size frame 1448 of 1538 bytes on the wire (IP, TCP with "
            "timestamps, Ethernet header, FCS, preamble, inter-frame gap) = 94.1 Mbit/s, the standard Fast "
            "Ethernet iperf figure. Consistent with an Internet download of \"10.2M\" (82 Mbit/s) on a 3B "
            "(https://github.com/raspberrypi/linux/issues/5320)."),
        "latency_ms": LATENCY_USB_NIC,
        "memory_mb": usable_memory(
            "4hOp", "Mem:           909Mi        66Mi       772Mi       0.0Ki        70Mi       787Mi", 787,
            "1 GB less the default 76 MB GPU split (" + MEMDOC + ": \"for Pis with 1GB or more of memory the "
            "default is 76\") and the kernel's reservations: Linux sees 909 MiB (Raspbian)."),
        "sustained": fig(
            1.0, "ASSUMED", FREQDOC,
            "\"predefined limit; this is 85°C on all models\" / \"between 80°C and 85°C … the ARM cores will be "
            "progressively throttled back\"",
            "With a fan: the Pi 3 B has no soft limit (only the 3B+ has one), throttling starts at 80 °C, and a "
            "fan-cooled BCM2837B0 stayed at 53.7 °C under 4-core 7-zip (" + sbcb_log("1isD") + "); ASSUMED the "
            "same for the Pi 3 B with a fan -> 1.0. PASSIVE cooling: under a 4-core NEON load (cpuburn-a53) a "
            "Pi 3 B with a 10 mm heatsink settles at 470-600 MHz, 39-50 % of 1.2 GHz (" + LINUX1337 + ": "
            "\"temp=90.8'C frequency(45)=600000000\"; \"~470MHz\" without heatsink): set sustained to about "
            "0.5 for a passively cooled board."),
    },
    "rpi3bplus": {
        "description": "Raspberry Pi 3 Model B+: BCM2837B0, 4x Cortex-A53 at 1.4 GHz, 1 GB LPDDR2, Gigabit "
                       "Ethernet over USB 2.0; with a fan",
        "cores": fig(4, "spec", "Raspberry Pi 3 Model B+ product brief", "", "4x Cortex-A53 at 1.4 GHz"),
        "sgemm_gflops": fig(
            round(2 * A53_DGEMM[0], 3), "inference", OB2413, A53_DGEMM_QUOTE.split(";")[0],
            "No SGEMM measurement of a Pi 3 B+ exists in the sources. Inference: single-core DGEMM 1.986 "
            "GFLOP/s x2 for fp32 (twice the NEON lanes) = 3.97 GFLOP/s. That build was 32-bit ARMV7; the "
            f"aarch64 A53 proxy (RK3399 little core) measured 6.41 GFLOP/s SGEMM ({OB2643}), an upper bound."),
        **sbcb_row("1isD", "| [Raspberry Pi 3 B+ (BCM2837B0)](results/1isD.txt) | with fan | 4.14 | Raspbian Stretch | "
                           "3670 | 1046 | 42600 | 1120 | 1600 | - |", 1120, 1046, "Tot:             100   1046   1046",
                   "the with-fan run (this profile assumes a fan); no-fan runs: 1050-1130 MB/s",
                   "p7zip 16.02, 32-bit build"),
        "gemm_threads": fig(
            A53_GEMM_THREADS, "measured", OB2413, A53_DGEMM_QUOTE,
            "1-3 threads measured (2t 1.94x, 3t 2.71x). 4 threads ASSUMED (the board rebooted; cause not "
            f"established): 2.71 x 14.2/12.1 (Pi 4 BLIS 4-over-3-thread gain, {OB2230}) = 3.18."),
        "cnn_threads": fig(
            cnn_threads("rpi3bplus"), "derived", NCNN, NCNN_QUOTE["rpi3bplus"],
            '676.14/417.17 = 1.62x on 4 threads (all fp32 models: 1.26-2.01x, median 1.55x). ' + CONV_THREADS_WHY),
        "memory_threads": MEM_THREADS_ASSUMED,
        "bandwidth_mbps": fig(
            224, "measured", JG_GBE,
            "\"it's still hampered by the USB 2.0 bus speed (so in real world use you get ~224 Mbps instead of "
            "~950 Mbps)\"",
            "iperf3 in geerlingguy/sbc-reviews#16 gave 253 Mbit/s (" + SBCR + ": network_mbps primary 253); "
            "the lower real-world figure is used because the USB 2.0 bus is shared by both directions "
            "(\"you'll never get more than around 300 Mbps either way\", geerlingguy/internet-pi#105) and "
            "training sends and receives at once."),
        "latency_ms": LATENCY_USB_NIC,
        "memory_mb": usable_memory(
            "1isD", "Mem:           927M         72M        597M        1.3M        257M        803M", 803,
            "1 GB less the 76 MB GPU split (" + MEMDOC + ") and the kernel: Linux sees 927 MiB (Raspbian "
            "Stretch)."),
        "sustained": fig(
            1.0, "derived", sbcb_log("1isD"),
            "7-zip multi-core with fan: \"17:42:42: 1400/1400MHz  3.41  80%   1%  79%   0%   0%   0%  53.7°C  "
            "1.3250V\"",
            "With a fan the board held 1400 MHz at <= 53.7 °C under a 4-core load, below the 60 °C soft limit ("
            + FREQDOC + ": \"When the soft limit is reached, the clock speed is reduced from 1.4GHz to 1.2GHz"
            " … By default, the soft limit is 60°C\") -> 1.0. A NEON GEMM load draws more power than 7-zip; "
            "if the SoC passes 60 °C the clock drops to 1.2 GHz (sustained 0.86). PASSIVE cooling: the soft "
            "limit \"is easily reached when all four ARM cores are in use\" (" + FW1014 + "); 7-zip multi no "
            "fan 3040-3240 vs 3670 with fan (" + SBCB + ") = 0.83-0.88; under-voltage (weak supply) 2100 = "
            "0.57. Set sustained to about 0.85 for a passively cooled board."),
    },
    "rpi4": {
        "description": "Raspberry Pi 4 Model B (4 GB): BCM2711, 4x Cortex-A72 at 1.8 GHz (the default of "
                       "revision C0 boards), LPDDR4-3200, Gigabit Ethernet (native); with a fan",
        "cores": fig(4, "spec", "Raspberry Pi 4 Model B product brief", "", "4x Cortex-A72"),
        "sgemm_gflops": fig(
            round(2 * 5.82, 3), "inference", BLIS754,
            "\"I can run HPL on a single core as well. Then HPL shows 5.82GFlop/s, divided by 1.8GHz gives 3.2 "
            "Flop/cycle/core\"",
            "No SGEMM measurement of a Pi 4 exists in the sources. Inference: single-core HPL (DGEMM-bound) "
            "5.82 GFLOP/s at 1.8 GHz x2 for fp32 = 11.6 GFLOP/s. Chosen clock: 1.8 GHz, \"default _without "
            "overvolting_ on revision C0 or later\" (" + SBCB + "). A 1.5 GHz board: HPL 4.8 GFLOP/s "
            f"({OB2230}), memcpy 2460 MB/s, 7-zip 1606: scale the rates by 1.5/1.8."),
        **sbcb_row("3OBF", "| [Raspberry Pi 4 B (BCM2711)](results/3OBF.txt) | 1800 MHz | 5.10 | Raspberry Pi OS "
                           "Bullseye **arm64** | 5790 | 1769 | 36260 | 2330 | 3120 | 8.74 |", 2330, 1769,
                   "Tot:             100   1769   1769",
                   "64-bit Raspberry Pi OS (what tilec's workers run); other 1.8 GHz runs: 2240-2780 MB/s",
                   "p7zip 16.02, 64-bit build"),
        "gemm_threads": fig(
            [1.0, round(PI4_BLIS_OMP[1] / PI4_BLIS_OMP[0], 2), round(PI4_BLIS_OMP[2] / PI4_BLIS_OMP[0], 2),
             round(PI4_BLIS_OMP[3] / PI4_BLIS_OMP[0], 2)], "measured", OB2230, PI4_BLIS_QUOTE,
            "HPL with BLIS OpenMP at 1.5 GHz: 1.87x / 2.63x / 3.09x; at 1.8 GHz 4 cores 17.93 vs 1 core 5.82 = "
            f"3.08x ({BLIS754}: \"On all four cores I get 17.93GFlop/s\"). OpenBLAS 0.3.5-0.3.7 on aarch64 "
            "collapsed beyond 2 threads (the bug reported in that issue) and is not used."),
        "cnn_threads": fig(
            cnn_threads("rpi4"), "derived", NCNN, NCNN_QUOTE["rpi4"],
            '372.99/207.22 = 1.80x on 4 threads at 1.8 GHz (all fp32 models: 1.19-3.46x, median 1.66x). ' + CONV_THREADS_WHY),
        "memory_threads": MEM_THREADS_ASSUMED,
        "bandwidth_mbps": fig(939, "measured", SBCR, "network_mbps: primary: 939",
                              "iperf3, geerlingguy/sbc-reviews#4"),
        "latency_ms": LATENCY_NATIVE_GBE,
        "memory_mb": usable_memory(
            "1MFf", "Mem:          3.8Gi       113Mi       3.3Gi       8.0Mi       389Mi       3.6Gi", 3.6 * 1024,
            "The 4 GB model (Raspbian). On the Pi 4 the 3D GPU uses Linux memory, gpu_mem stays small (" + MEMDOC
            + "). An 8 GB board on Debian 13 used 220 MiB after boot (geerlingguy/sbc-reviews#110)."),
        "sustained": fig(
            1.0, "measured", ARXIV_COOLING,
            "\"hysteresis-based active cooling prevented thermal throttling in all cases, thereby improving the "
            "throughput up to approximately 90% versus no cooling\"",
            "With a fan: no throttling in 80 CNN inference cases -> 1.0. PASSIVE cooling: up to ~90 % more "
            "throughput with the fan means an uncooled board can fall to 1/1.9 = 0.53; a heatsink alone \"does "
            "very little during extended high-load\" (https://blog.pimoroni.com/raspberry-pi-4-thermals-and-"
            "fan-shim/): set sustained to about 0.55 without a fan."),
    },
    "rpi5": {
        "description": "Raspberry Pi 5 (4 GB): BCM2712, 4x Cortex-A76 at 2.4 GHz, LPDDR4X-4267, Gigabit "
                       "Ethernet; with the Active Cooler",
        "cores": fig(4, "spec", "Raspberry Pi 5 product brief", "", "4x Cortex-A76 at 2.4 GHz"),
        "sgemm_gflops": fig(
            round(2 * 15.31, 3), "inference", OB4581,
            "target armv8: \"| 1  | 15.31  | 6.4 |15.86 | 6.9 |\" (HPL GFLOP/s, 1 thread, N=28000); \"This is "
            "with the official heatsink and active cooler. There is no thermal throttling detected.\"",
            "No SGEMM measurement of a Pi 5 exists in the sources. Inference: single-core HPL 15.31 GFLOP/s x2 "
            "for fp32 = 30.6 GFLOP/s (the CORTEXX1 build: 15.53)."),
        **sbcb_row("Au3jaA", "| [Raspberry Pi 5 B (BCM2712)](results/Au3jaA.txt) | 2400 MHz | 6.1 | Bookworm arm64 | "
                             "11010 | 3196 | 1367740 | 5270 | 14060 | 15.39 |", 5270, 3196,
                   "Tot:             100   3197   3196",
                   "a 4 GB board (free: \"Mem: 4.0Gi\"); a 16 GB board on kernel 6.6: 6025 MB/s; "
                   "geerlingguy/sbc-reviews#21: 4805 MB/s", "p7zip 16.02, 64-bit build"),
        "gemm_threads": fig(
            [1.0, round(28.71 / 15.31, 2), round(35.01 / 15.31, 2), round(39.17 / 15.31, 2)], "measured", OB4581,
            "target armv8 HPL GFLOP/s on 1..4 threads: 15.31 / 28.71 / 35.01 / 39.17",
            "1.88x / 2.29x / 2.56x. The CORTEXX1 build collapsed on 4 threads (19.25, the reported bug) and is "
            "not used; Jeff Geerling's 4-core HPL 30.2-37.9 GFLOP/s is 1.9-2.4x the 1-core figure."),
        "cnn_threads": fig(
            cnn_threads("rpi5"), "derived", NCNN, NCNN_QUOTE["rpi5"],
            '68.02/46.29 = 1.47x on 4 threads (fp32 models: 1.26-2.11x, median 1.67x). ' + CONV_THREADS_WHY),
        "memory_threads": fig(PI5_MEM_THREADS, "measured", LLAMA_STREAM, PI5_STREAM_QUOTE,
                              "STREAM read: 2 threads 1.43x, 4 threads 1.25x of one; 3 threads not measured "
                              "(interpolated: 1.34x). DRAM saturates at about two cores."),
        "bandwidth_mbps": fig(938, "measured", SBCR, "network_mbps: primary: 938",
                              "iperf3, geerlingguy/sbc-reviews#21 (the same 938 for CM5 and Pi 500)"),
        "latency_ms": LATENCY_NATIVE_GBE,
        "memory_mb": usable_memory(
            "Au3jaA", "Mem:           4.0Gi       190Mi       3.7Gi       4.5Mi        83Mi       3.8Gi", 3.8 * 1024,
            "The 4 GB model (Bookworm arm64). No gpu_mem default for the Pi 5 was found."),
        "sustained": fig(
            1.0, "measured", PHORONIX5,
            "\"When installing the active cooler, the SoC temperature under the same set of benchmarks was 56 "
            "degrees with a peak of just 72 degrees. The active cooler allowed the Raspberry Pi 5 to stay at "
            "2.4GHz consistently\"",
            "With the Active Cooler -> 1.0 (also " + OB4581 + ": \"no thermal throttling detected\" under HPL). "
            "PASSIVE/no cooling: \"Without any heatsink, the Raspberry Pi 5 SoC had an 81 degree average and a "
            "peak of 89 degrees\" (same page); no sustained clock or throughput under load was found; the "
            "vendor notes that \"even when fully throttled, a Raspberry Pi 5 is still going to run faster than "
            "a Raspberry Pi 4!\" (https://www.eenewseurope.com/en/heating-and-cooling-raspberry-pi-5/). Without "
            "a cooler, lower sustained (ASSUMED ~0.6, by analogy with the Pi 4's 0.53)."),
    },
}


# -- measuring the reference machine ---------------------------------------------------
def measure_sgemm(n=1024, reps=10):
    """Single-core SGEMM GFLOP/s: numpy float32 ``n``^3 matmul, BLAS on one thread, best of ``reps``."""
    import numpy as np
    from tilec.profile_measure import _time
    from tilec_runtime.blas_threads import limit_blas_threads
    if not limit_blas_threads(1):
        raise SystemExit("pi_profiles: no OpenBLAS found to limit to one thread; the SGEMM would not be one core")
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    c = np.empty((n, n), np.float32)
    best = _time(lambda: np.matmul(a, b, out=c), 0, reps)[0]
    return 2 * n ** 3 / best / 1e9


def measure_memcpy(mib=64, reps=10):
    """Single-core memcpy MB/s (1 MB = 1e6 bytes): numpy copyto of a ``mib`` MiB float32 array, bytes
    copied per second (like tinymembench's memcpy), best of ``reps``."""
    import numpy as np
    from tilec.profile_measure import _time
    n = mib * (1 << 20) // 4
    src, dst = np.ones(n, np.float32), np.zeros(n, np.float32)
    best = _time(lambda: np.copyto(dst, src), 0, reps)[0]  # its warm-up call is the first touch
    return n * 4 / best / 1e6


def measure_7zip(runs=4):
    """The 7-zip single-thread rating as sbc-bench takes it (``7z b -mmt=1``, the ``Tot:`` line), best of
    ``runs``; None without 7z. sbc-bench reports the rating on an idle board (usage 100 %); on a shared
    machine the process gets less than a whole core, so the rating normalised to 100 % usage (the ``R/U``
    column, equal to the rating at 100 %) is what is compared."""
    exe = shutil.which("7za") or shutil.which("7z")
    if exe is None:
        return None
    runs_out, version = [], ""
    for _ in range(runs):
        out = subprocess.run([exe, "b", "-mmt=1"], capture_output=True, text=True, check=True).stdout
        _, usage, per_usage, rating = [line.split() for line in out.splitlines() if line.startswith("Tot:")][-1]
        runs_out.append({"usage_percent": int(usage), "rating_per_usage": int(per_usage), "rating": int(rating)})
        version = next((line.strip() for line in out.splitlines() if line.startswith("7-Zip")), "")
    return {"rating": max(r["rating_per_usage"] for r in runs_out), "runs": runs_out, "version": version,
            "command": f"{Path(exe).name} b -mmt=1",
            "how": "best over the runs of the Tot: line's R/U (the rating at 100 % CPU usage)"}


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_host():
    """Everything the derivation needs from this machine, as a JSON-able dict."""
    import numpy as np
    from tilec.profile_measure import measure_profile
    from tilec_runtime.blas_threads import loaded_blas
    started = datetime.datetime.now(datetime.timezone.utc)
    print("pi_profiles: measuring tilec's kernels on this machine (measure_profile, full) ...", flush=True)
    reference = measure_profile(name="reference", rounds=3)  # best of 3 rounds: a shared machine
    print("pi_profiles: single-core SGEMM, memcpy, 7-zip ...", flush=True)
    sgemm = measure_sgemm(reps=20)
    memcpy = measure_memcpy(reps=30)
    cached = measure_memcpy(mib=4, reps=50)
    sevenzip = measure_7zip(runs=4)
    return {
        "what": "the reference machine of tools/pi_profiles.py: tilec's kernels and three one-core benchmarks",
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"host": platform.node(), "cpu": _cpu_model(), "arch": platform.machine(),
                    "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
                    "blas": [Path(p).name for p in loaded_blas()]},
        "sgemm_gflops": round(sgemm, 2),
        "sgemm_how": "numpy float32 matmul 1024^3, OpenBLAS limited to one thread, best of 20",
        "memcpy_mbps": round(memcpy, 1),
        "memcpy_how": "numpy copyto of a 64 MiB float32 array, bytes copied per second (1 MB = 1e6 B), best of 30",
        "memcpy_4mib_mbps": round(cached, 1),
        "memcpy_4mib_how": "the same with a 4 MiB array (cache-resident here; not used by the derivation: for the "
                           "record, see the note on memory-bound kinds in the tool's docstring)",
        "sevenzip_single": sevenzip,
        "reference_profile": reference,
    }



# -- the derivation ----------------------------------------------------------------------
def sig(x, n=SIG):
    """``x`` to ``n`` significant figures (0 stays 0)."""
    return 0.0 if x == 0 else round(x, n - 1 - int(math.floor(math.log10(abs(x)))))


def ratios(host, board):
    """(r_gemm, r_mem, r_scalar, what the scalar ratio is): reference over board."""
    b = BOARDS[board]
    r_gemm = host["sgemm_gflops"] / b["sgemm_gflops"]["value"]
    r_mem = host["memcpy_mbps"] / b["memcpy_mbps"]["value"]
    seven = host.get("sevenzip_single")
    if not seven:
        raise SystemExit("pi_profiles: the host measurements have no 7-zip rating: install 7z (p7zip-full) and "
                         "run with --measure")
    return r_gemm, r_mem, seven["rating"] / b["sevenzip_single"]["value"]


def scale_kernels(reference, r_gemm, r_mem, r_scalar):
    """The reference machine's kernel coefficients scaled to a board (see the module docstring)."""
    out = {}
    for kind, per in reference["kernels"].items():
        flop_ratio = r_gemm if kind in GEMM_KINDS else r_mem
        out[kind] = {d: {"overhead_us": sig(k["overhead_us"] * r_scalar),
                         "s_per_gflop": sig(k["s_per_gflop"] * flop_ratio),
                         "s_per_gb": sig(k["s_per_gb"] * r_mem)} for d, k in per.items()}
    return out


def _sentence(text):
    text = text.strip()
    return text if text.endswith(".") else text + "."


def _text(f, unit=""):
    """A figure as one line of a profile's ``sources``: value (status), reasoning, source -- quote."""
    parts = [f"{f['value']}{unit} ({f['status']})."]
    if f["note"]:
        parts.append(_sentence(f["note"]))
    if f["source"]:
        parts.append(f"Source: {f['source']}" + (f" -- quote: {f['quote']}" if f["quote"] else ""))
    return " ".join(parts)


def derive(host, board, conv_threads="cnn_threads"):
    """The profile dict of ``board`` from the reference measurements ``host`` (``conv_threads``: which
    board table ``threads.conv`` comes from; "gemm_threads" gives the first, HPL-based, derivation)."""
    from tilec.profiles import FORMAT, KERNEL_KINDS, VERSION
    b = BOARDS[board]
    ref = host["reference_profile"]
    r_gemm, r_mem, r_scalar = ratios(host, board)
    ref_conv = ref["kernels"]["conv"]
    gemm_t, mem_t = b[conv_threads]["value"], b["memory_threads"]["value"]
    threads = {kind: list(gemm_t if kind == "conv" else [1.0] if kind == "connected" else mem_t)
               for kind in KERNEL_KINDS}
    m = host["machine"]
    seven = host["sevenzip_single"]
    sources = {
        "note": f"Derived by tools/pi_profiles.py from cited public measurements of the board and a reference "
                f"profile of tilec's kernels measured on {m['cpu']} ({host['date']}); no Raspberry Pi was "
                f"measured. `tilec profile` on the board replaces all of it. Status words: measured (on this "
                f"board), inference (a stated rule applied to a measurement), derived (arithmetic on cited "
                f"numbers), ASSUMED (nothing found; the reason is given).",
        "derivation": "kernels = the reference machine's coefficients (tools/pi_profiles_host.json) scaled per "
                      "kind: conv and connected (GEMM-bound): s_per_gflop x r_gemm, s_per_gb x r_mem; epilogue, "
                      "maxpool, elementwise (memory-bound, their FLOPs are streaming element-wise work): both "
                      "s_per_gflop and s_per_gb x r_mem; every kind: overhead_us x r_scalar. "
                      f"Here r_gemm = SGEMM ref/board = {host['sgemm_gflops']}/{b['sgemm_gflops']['value']} = "
                      f"{r_gemm:.2f}, r_mem = memcpy ref/board = {host['memcpy_mbps']}/{b['memcpy_mbps']['value']}"
                      f" = {r_mem:.2f}, r_scalar = 7-zip single ref/board = {seven['rating']}/"
                      f"{b['sevenzip_single']['value']} = {r_scalar:.2f}. 3 significant figures.",
        "reference machine": f"{m['cpu']}, {m['arch']}, Python {m['python']}, numpy {m['numpy']} ({', '.join(m['blas'])}): "
                             f"SGEMM {host['sgemm_gflops']} GFLOP/s ({host['sgemm_how']}); memcpy "
                             f"{host['memcpy_mbps']} MB/s ({host['memcpy_how']}); 7-zip single {seven['rating']} "
                             f"({seven['command']}, {seven['version']}; the boards' ratings are p7zip 16.02)",
        "kernels.conv": f"forward/backward s_per_gflop = the reference's {ref_conv['forward']['s_per_gflop']}/"
                        f"{ref_conv['backward']['s_per_gflop']} x r_gemm {r_gemm:.2f}; s_per_gb = "
                        f"{ref_conv['forward']['s_per_gb']}/{ref_conv['backward']['s_per_gb']} x r_mem {r_mem:.2f}; "
                        f"overhead_us = {ref_conv['forward']['overhead_us']}/{ref_conv['backward']['overhead_us']} x "
                        f"r_scalar {r_scalar:.2f} (the reference's conv runs at "
                        f"{1 / ref_conv['forward']['s_per_gflop']:.0f} GFLOP/s on its {host['sgemm_gflops']} "
                        f"GFLOP/s SGEMM)",
        "sgemm_gflops": _text(b["sgemm_gflops"], " GFLOP/s"),
        "memcpy_mbps": _text(b["memcpy_mbps"], " MB/s"),
        "sevenzip_single": _text(b["sevenzip_single"]) + " -- stands for the Python/numpy per-call cost "
                           "(integer, branchy, cache-resident code like the interpreter's); no Python timing on "
                           "a Pi was found",
        "threads.conv": _text(b[conv_threads]),
        "gemm_threads (upper bound, not used)": _text(b["gemm_threads"]),
        "threads.epilogue/maxpool/elementwise": _text(b["memory_threads"]),
        "threads.connected": "[1.0]: the runtime keeps BLAS single-threaded in the layers it runs whole",
        "link.bandwidth_mbps": _text(b["bandwidth_mbps"], " Mbit/s"),
        "link.latency_ms": _text(b["latency_ms"], " ms"),
        "memory_mb": _text(b["memory_mb"], " MB"),
        "process_overhead_mb": "60 (ASSUMED): CPython + numpy + scipy + the runtime resident before any array, "
                               "as estimated on 64-bit x86 Linux; a 64-bit Pi loads the same libraries",
        "sustained": _text(b["sustained"]),
        "cores": _text(b["cores"]),
    }
    return {
        "format": FORMAT, "version": VERSION, "name": board, "description": b["description"],
        "cores": b["cores"]["value"], "memory_mb": b["memory_mb"]["value"], "process_overhead_mb": 60,
        "link": {"bandwidth_mbps": b["bandwidth_mbps"]["value"], "latency_ms": b["latency_ms"]["value"]},
        "kernels": scale_kernels(ref, r_gemm, r_mem, r_scalar),
        "threads": threads,
        "sustained": b["sustained"]["value"],
        "sources": sources,
    }


def profile_text(data):
    return json.dumps(data, indent=1, ensure_ascii=False) + "\n"


# -- validation --------------------------------------------------------------------------
YOLOV2_TINY_GFLOP = 6.97   # forward, 416x416 (darknet's count for yolov2-tiny)
YOLOV4_TINY_GFLOP = 6.9    # forward, 416x416
RATIO_RANGE = (1.4, 2.2)   # one board on all cores over one core: public whole-CNN 4t/1t is 1.26x-2.11x


def pi3_public_range():
    """(low, high, band_low, band_high, reasoning): seconds of one yolov2-tiny training step (batch 1) on a
    Pi 3 B that the public inference timings imply (the range) and the narrower band at the thread gain
    measured for yolov4-tiny."""
    clock = 1.4 / 1.2                       # ncnn's numbers are from a 3B+ at 1.4 GHz; the 3B runs 1.2 GHz
    flops = YOLOV2_TINY_GFLOP / YOLOV4_TINY_GFLOP
    one, four = NCNN_YOLOV4_TINY["rpi3bplus"]
    ncnn_1t, ncnn_4t = one / 1e3 * clock * flops, four / 1e3 * clock * flops  # forward s at 1.2 GHz
    # ncnn's per-FLOP advantage over a plain SGEMM on the same core: 6.9 GFLOP in 0.676 s on one thread is
    # 10.2 GFLOP/s at 1.4 GHz (Winograd: fewer real multiplications), against 3.97 (2x the DGEMM) .. 6.41
    # (aarch64 A53 proxy) GFLOP/s of SGEMM
    ncnn_rate = YOLOV4_TINY_GFLOP / (one / 1e3)
    adv_lo, adv_hi = ncnn_rate / 6.41, ncnn_rate / (2 * A53_DGEMM[0])
    gain, gain_lo, gain_hi = one / four, 1.26, 2.11  # 4-thread gain: yolov4-tiny on the 3B+; all public fp32
    low, high = 3 * ncnn_1t * adv_lo / gain_hi, 3 * ncnn_1t * adv_hi / gain_lo
    band_lo, band_hi = 3 * ncnn_1t * adv_lo / gain, 3 * ncnn_1t * adv_hi / gain
    why = (f"ncnn yolov4-tiny (416x416, 6.9 GFLOP forward, ~ yolov2-tiny's 6.97) on a Pi 3 B+ at 1.4 GHz: "
           f"{one:.0f} ms on 1 thread, {four:.0f} ms on 4 ({NCNN}); at the 3B's 1.2 GHz and 6.97 GFLOP: "
           f"{ncnn_1t:.2f} s / {ncnn_4t:.2f} s. A training step is ~3x the forward FLOPs (backward: input and "
           f"weight gradients), so ncnn-speed kernels would need 3 x {ncnn_4t:.2f} = {3 * ncnn_4t:.2f} s on 4 "
           f"threads ({3 * ncnn_1t:.2f} s on 1): a floor. tilec runs im2col + SGEMM, not ncnn's NEON Winograd: "
           f"ncnn's 1-thread {ncnn_rate:.1f} GFLOP/s effective is {adv_lo:.1f}-{adv_hi:.1f}x an A53's SGEMM "
           f"(6.41 GFLOP/s aarch64 proxy .. 3.97 from the Pi 3 B+ DGEMM), so a trainer whose convolutions run at "
           f"the SGEMM rate needs ~3 x {ncnn_1t:.2f} x {adv_lo:.1f}..{adv_hi:.1f} = {3 * ncnn_1t * adv_lo:.1f}-"
           f"{3 * ncnn_1t * adv_hi:.1f} s on one core (more if below that rate); on 4 threads divided by the public whole-CNN gain, {gain_lo}-{gain_hi}x: range "
           f"{low:.2f}-{high:.2f} s; at the gain measured for yolov4-tiny on the 3B+ ({gain:.2f}x): "
           f"{band_lo:.2f}-{band_hi:.2f} s. Cross-check: darknet-nnpack's Tiny-YOLO forward on a Pi 3, 1.3 s "
           f"(threads not stated, {NNPACK}), makes 3 x 1.3 = 3.9 s for a trainer at NNPACK's speed.")
    return low, high, band_lo, band_hi, why


def simulate_board(profile_path, workdir):
    """(step_s, one_core_s) of yolov2-tiny batch 1 on one board of ``profile_path``."""
    work = Path(workdir)
    cluster = work / "one.yaml"
    cluster.write_text(f"devices:\n  - {{name: board, profile: {Path(profile_path).resolve()}}}\n")
    plan = work / "plan"
    run = [sys.executable, "-m", "tilec.cli"]
    subprocess.run(run + ["compile", "yolov2-tiny", "--cluster", str(cluster), "--batch", "1", "-o", str(plan)],
                   check=True, capture_output=True, text=True)
    out = subprocess.run(run + ["simulate", str(plan), "--json"], check=True, capture_output=True, text=True).stdout
    data = json.loads(out)
    return data["step_s"], data["one_core_s"]


def validate(paths, label=""):
    """Print and check the one-board simulation of every board (``paths``: board -> profile file);
    returns True when all checks pass."""
    ok = True
    low, high, band_lo, band_hi, _ = pi3_public_range()
    print(f"{label}\n{'board':<11}{'step_s':>9}{'one_core_s':>12}{'ratio':>8}  check")
    for board, path in paths.items():
        with tempfile.TemporaryDirectory() as tmp:
            step, one = simulate_board(path, tmp)
        ratio = one / step
        good = RATIO_RANGE[0] <= ratio <= RATIO_RANGE[1]
        checks = [f"ratio {'in' if good else 'OUTSIDE'} {RATIO_RANGE[0]}-{RATIO_RANGE[1]}x"]
        if board == "rpi3b":
            inside = low <= step <= high
            checks.append(f"step {'inside' if inside else 'OUTSIDE'} the public range {low:.2f}-{high:.2f} s "
                          f"({'inside' if band_lo <= step <= band_hi else 'outside'} the band "
                          f"{band_lo:.2f}-{band_hi:.2f} s)")
            good = good and inside
        ok = ok and good
        print(f"{board:<11}{step:>9.3f}{one:>12.3f}{ratio:>7.2f}x  {'; '.join(checks)}")
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measure", action="store_true", help=f"measure this machine and rewrite {HOST_FILE.name}")
    ap.add_argument("--host", default=str(HOST_FILE), help="the cached reference measurements (JSON)")
    ap.add_argument("--out", default=str(PROFILES_DIR), help="where to write rpi*.json (default: the shipped ones)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if the profiles in --out differ")
    ap.add_argument("--validate", action="store_true", help="compile + simulate yolov2-tiny on one board of each")
    args = ap.parse_args(argv)
    host_path = Path(args.host)
    if args.measure:
        host = measure_host()
        atomic_json(host_path, host, indent=1)
        print(f"pi_profiles: wrote {host_path}")
    host = json.loads(host_path.read_text())
    out = Path(args.out)
    paths, stale = {}, []
    for board in BOARDS:
        data = derive(host, board)
        from tilec.profiles import profile_from_dict
        profile_from_dict(data, board)  # the loader's checks
        path = out / f"{board}.json"
        paths[board] = path
        if args.check:
            if not path.exists() or path.read_text() != profile_text(data):
                stale.append(board)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, profile_text(data))
        r_gemm, r_mem, r_scalar = ratios(host, board)
        conv = data["kernels"]["conv"]["forward"]
        print(f"pi_profiles: {path}  r_gemm {r_gemm:.1f}  r_mem {r_mem:.1f}  r_scalar {r_scalar:.1f}  conv fwd "
              f"{conv['s_per_gflop']} s/GFLOP {conv['s_per_gb']} s/GB {conv['overhead_us']} us  threads.conv "
              f"{data['threads']['conv']}  sustained {data['sustained']}")
    if stale:
        print(f"pi_profiles: differ from the derivation: {', '.join(stale)} (run tools/pi_profiles.py)")
        return 1
    if args.validate:
        print("Pi 3 B public range for one yolov2-tiny training step (batch 1): " + pi3_public_range()[-1])
        with tempfile.TemporaryDirectory() as tmp:  # the first derivation, for the record
            first = {}
            for board in BOARDS:
                first[board] = Path(tmp) / f"{board}.json"
                first[board].write_text(profile_text(derive(host, board, conv_threads="gemm_threads")))
            validate(first, "threads.conv from GEMM/HPL scaling (first derivation, not shipped):")
        return 0 if validate(paths, "threads.conv from whole-CNN scaling (shipped):") else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
