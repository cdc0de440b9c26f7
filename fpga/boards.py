"""FPGA board presets: the part Vitis HLS targets and the resources it offers.

Figures are the programmable-logic totals of each device from AMD/Xilinx's
product selection tables (Zynq-7000 SoC product selection guide, XMP097;
Zynq UltraScale+ MPSoC product selection guide, XMP104; Kria K26 SOM data
sheet, DS987) and the boards' user guides for the part numbers. BRAM is
counted in 18 Kb halves (one RAMB36 = two RAMB18), the unit Vitis HLS reports.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgekit.errors import UserError


@dataclass(frozen=True)
class Board:
    name: str
    part: str
    dsp: int
    bram_18k: int
    lut: int
    ff: int
    uram: int = 0
    clock_mhz: float = 200.0  # default PL clock for the generated design
    description: str = ""


BOARDS: dict[str, Board] = {
    b.name: b
    for b in (
        # Avnet Ultra96-V2: Zynq UltraScale+ ZU3EG (216 RAMB36 = 432 RAMB18, 360 DSP48E2, 70,560 LUT, 141,120 FF).
        Board("ultra96v2", "xczu3eg-sbva484-1-i", dsp=360, bram_18k=432, lut=70_560, ff=141_120, uram=0,
              clock_mhz=200.0, description="Avnet Ultra96-V2 (Zynq UltraScale+ ZU3EG)"),
        # TUL PYNQ-Z2: Zynq-7020 (140 RAMB36 = 280 RAMB18, 220 DSP48E1, 53,200 LUT, 106,400 FF).
        Board("pynq-z2", "xc7z020clg400-1", dsp=220, bram_18k=280, lut=53_200, ff=106_400, uram=0,
              clock_mhz=100.0, description="TUL PYNQ-Z2 (Zynq-7020)"),
        # AMD ZCU104: Zynq UltraScale+ ZU7EV (312 RAMB36 = 624 RAMB18, 96 URAM, 1,728 DSP48E2, 230,400 LUT, 460,800 FF).
        Board("zcu104", "xczu7ev-ffvc1156-2-e", dsp=1_728, bram_18k=624, lut=230_400, ff=460_800, uram=96,
              clock_mhz=250.0, description="AMD ZCU104 (Zynq UltraScale+ ZU7EV)"),
        # AMD ZCU102: Zynq UltraScale+ ZU9EG (912 RAMB36 = 1,824 RAMB18, 2,520 DSP48E2, 274,080 LUT, 548,160 FF).
        Board("zcu102", "xczu9eg-ffvb1156-2-e", dsp=2_520, bram_18k=1_824, lut=274_080, ff=548_160, uram=0,
              clock_mhz=250.0, description="AMD ZCU102 (Zynq UltraScale+ ZU9EG)"),
        # AMD Kria KV260: K26 SOM, XCK26 (144 RAMB36 = 288 RAMB18, 64 URAM, 1,248 DSP48E2, 117,120 LUT, 234,240 FF).
        Board("kv260", "xck26-sfvc784-2LV-c", dsp=1_248, bram_18k=288, lut=117_120, ff=234_240, uram=64,
              clock_mhz=250.0, description="AMD Kria KV260 (K26 SOM)"),
    )
}


def get_board(name: str | Board) -> Board:
    """The preset called ``name`` (case-insensitive; '_' and '-' alike)."""
    if isinstance(name, Board):
        return name
    key = str(name).strip().lower().replace("_", "-")
    for board in BOARDS.values():
        if board.name == key or board.name.replace("-", "") == key.replace("-", ""):
            return board
    raise UserError(f"unknown FPGA board {name!r}; valid boards: {', '.join(BOARDS)}")
