"""Per-SM limits of the architectures the report compiles for, and the occupancy they allow."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable


def keep_reason_on(reason: str, archs: tuple[str, ...], arch: str) -> str:
    """A variant's keep reason where it excuses ``arch`` (``archs`` empty: everywhere), else ""."""
    return reason if not archs or arch in archs else ""

@dataclass(frozen=True)
class ArchLimits:
    """Per-SM resources of one architecture (CUDA C Programming Guide, compute capabilities)."""

    capability: int
    shared_per_block: int          # largest opt-in shared memory of one block, static + dynamic
    shared_per_sm: int             # shared memory of one SM at the largest carveout
    matrix: str                    # the matrix instruction dot kernels must use here
    registers_per_sm: int = 65536
    max_registers_per_thread: int = 255
    register_unit: int = 256       # registers are allocated per warp in units of 256
    register_banks: int = 4        # one register file per SM sub-partition
    shared_unit: int = 128         # shared memory is allocated per block in units of 128 bytes
    shared_reserved: int = 1024    # the system reserves 1 KB of shared memory per block
    max_warps: int = 64
    max_blocks: int = 32


ARCHS: dict[str, ArchLimits] = {
    "sm_90": ArchLimits(capability=90, shared_per_block=227 * 1024, shared_per_sm=228 * 1024,
                        matrix="wgmma"),
    "sm_80": ArchLimits(capability=80, shared_per_block=163 * 1024, shared_per_sm=164 * 1024,
                        matrix="mma"),
}
DEFAULT_ARCHS = ("sm_90", "sm_80")


def check_archs(archs: Iterable[str]) -> tuple[str, ...]:
    archs = tuple(archs)
    unknown = [a for a in archs if a not in ARCHS]
    if unknown or not archs:
        raise ValueError(f"arch must be among {sorted(ARCHS)}, got {list(archs)}")
    return archs


def occupancy(registers: int, shared_bytes: int, num_warps: int, arch: str) -> dict[str, Any]:
    """Resident blocks and warps per SM of a kernel, and which resource limits them.

    Registers: each warp takes ``registers * 32`` rounded up to 256, out of one of the four
    16K-register sub-partition files. Shared memory: each block takes ``static + dynamic + 1 KB``
    rounded up to 128 bytes. Warps: 64 per SM; blocks: 32 per SM.
    """
    lim = ARCHS[arch]
    warp_registers = -(-max(registers, 1) * 32 // lim.register_unit) * lim.register_unit
    warps_by_registers = (lim.registers_per_sm // lim.register_banks // warp_registers
                          * lim.register_banks)
    block_shared = -(-(shared_bytes + lim.shared_reserved) // lim.shared_unit) * lim.shared_unit
    fits_shared = shared_bytes <= lim.shared_per_block
    fits_registers = registers <= lim.max_registers_per_thread
    # On a tie the hardware ceilings (warps, blocks) are named: nothing else would raise it.
    limits = {
        "warps": lim.max_warps // num_warps,
        "blocks": lim.max_blocks,
        "registers": warps_by_registers // num_warps if fits_registers else 0,
        "shared memory": lim.shared_per_sm // block_shared if fits_shared else 0,
    }
    limiter = min(limits, key=limits.get)
    blocks = limits[limiter]
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * num_warps,
        "occupancy": blocks * num_warps / lim.max_warps,
        "occupancy_limiter": limiter,
    }
