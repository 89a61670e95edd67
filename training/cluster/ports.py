"""Rendezvous ports (MASTER_PORT) from a documented range below Linux's ephemeral ports.

    MASTER_PORT = 15000 + job id mod 15000     (15000-29999)

Linux picks the local port of every outgoing connection from net.ipv4.ip_local_port_range (32768-60999
by default), so a rendezvous port inside that range can already be held by some connection on the
master node when torch.distributed binds it. `rendezvous_port` starts at the job's port and moves to the
next port of the range that it can bind on this host (the collision check); ports inside this host's
ephemeral range are skipped. Only the master node can check, so the SLURM batch script, which runs on
the first node of the allocation, picks the port and exports MASTER_PORT to every task
(slurm/launch.sh: `python -m training.cluster.ports $SLURM_JOB_ID`).
"""

from __future__ import annotations

import socket
import sys

PORT_RANGE = (15000, 30000)  # [first, last + 1)


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """(first, last) of this host's ephemeral ports (Linux's default when unreadable)."""
    try:
        with open(path) as f:
            lo, hi = (int(v) for v in f.read().split()[:2])
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def job_port(job_id: int) -> int:
    """The job's port in PORT_RANGE (no check): what every rank computes from the job id alone."""
    lo, hi = PORT_RANGE
    return lo + int(job_id) % (hi - lo)


def port_is_free(port: int, host: str = "") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS has just found free on `host` (one-host process groups: tests, benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rendezvous_port(job_id: int, is_free=port_is_free) -> int:
    """The job's port, or the next one of PORT_RANGE (wrapping around) that is free on this host, outside
    its ephemeral range if it can be (a host whose ephemeral range covers all of PORT_RANGE gets any free
    port of it). Raises RuntimeError when the whole range is taken."""
    lo, hi = PORT_RANGE
    eph_lo, eph_hi = ephemeral_range()
    start = job_port(job_id)
    order = [lo + (start - lo + i) % (hi - lo) for i in range(hi - lo)]
    outside = [p for p in order if not eph_lo <= p <= eph_hi]
    for port in outside or order:
        if is_free(port):
            return port
    raise RuntimeError(f"no free rendezvous port in {lo}-{hi - 1} (ephemeral range of this host: "
                       f"{eph_lo}-{eph_hi}); set MASTER_PORT")


def main(argv: list[str]) -> int:
    job = int(argv[0]) if argv and argv[0].strip() else 0
    eph_lo, eph_hi = ephemeral_range()
    if eph_lo < PORT_RANGE[1] and eph_hi >= PORT_RANGE[0]:
        print(f"warning: this host's ephemeral ports {eph_lo}-{eph_hi} overlap the rendezvous range "
              f"{PORT_RANGE[0]}-{PORT_RANGE[1] - 1}; those ports are skipped", file=sys.stderr)
    print(rendezvous_port(job))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
