"""Hand-written C++ that every generated HLS project carries, verbatim.

Kept as Python strings (not loose files) so they install with the package and
need no package-data entry. ``fpga/hls.py`` writes them next to the generated
``defines.h``, weight headers and top function.

- ``edgekit_stream.h``: ``hls::stream``. Under Vitis HLS it is Xilinx's own
  (``<hls_stream.h>``); for the g++ C-simulation (``-DEDGEKIT_CSIM``) it is a
  small project-owned FIFO on ``std::deque`` with the subset of the interface
  the generated code uses.
- ``engine.h``: the dataflow processes (templates over a per-layer config
  struct from ``defines.h``): pointwise conv, full and depthwise 3x3 conv with
  a line buffer, the fused engine (1x1 conv -> requantize -> line buffer ->
  offset conv -> deformable depthwise 3x3 -> requantize), upsample, fork,
  drain, and the m_axi readers/writers. Channel routing (concat, split,
  shuffle) is generated per plan by ``fpga/hls.py`` (``routes.h``).

The parallelism pragmas take their factors from the config structs
(``PO`` output channels and ``PI`` input channels per cycle), the same numbers
``fpga/estimate.py`` prices, so the estimate describes this code.
"""

from __future__ import annotations

STREAM_H = r"""// edgekit_stream.h: the stream type of edgekit's generated HLS code.
// Under Vitis HLS (csim, csynth, cosim) this is Xilinx's hls::stream. For the g++
// C-simulation, compiled with -DEDGEKIT_CSIM, it is this minimal FIFO written for
// edgekit (Apache-2.0): unbounded, so processes may run one after another in
// topological order, and strict: reading an empty stream or leaving values
// unread is a design error and aborts the simulation.
#ifndef EDGEKIT_STREAM_H
#define EDGEKIT_STREAM_H

#ifndef EDGEKIT_CSIM
#include <hls_stream.h>
#else
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <string>

namespace hls {

template <typename T>
class stream {
 public:
  stream() : name_("unnamed") {}
  explicit stream(const char* name) : name_(name) {}
  stream(const stream&) = delete;
  stream& operator=(const stream&) = delete;
  ~stream() {
    if (!fifo_.empty()) {
      std::fprintf(stderr, "edgekit csim: stream %s destroyed with %zu unread values\n", name_.c_str(), fifo_.size());
      std::abort();
    }
  }

  bool empty() const { return fifo_.empty(); }
  bool full() const { return false; }
  std::size_t size() const { return fifo_.size(); }

  void write(const T& value) { fifo_.push_back(value); }
  bool write_nb(const T& value) {
    write(value);
    return true;
  }

  T read() {
    if (fifo_.empty()) {
      std::fprintf(stderr, "edgekit csim: read from empty stream %s\n", name_.c_str());
      std::abort();
    }
    T value = fifo_.front();
    fifo_.pop_front();
    return value;
  }
  void read(T& value) { value = read(); }
  bool read_nb(T& value) {
    if (fifo_.empty()) return false;
    value = read();
    return true;
  }

 private:
  std::string name_;
  std::deque<T> fifo_;
};

}  // namespace hls
#endif  // EDGEKIT_CSIM
#endif  // EDGEKIT_STREAM_H
"""

ENGINE_H = r"""// engine.h: edgekit's HLS dataflow processes (Apache-2.0).
//
// Tensors travel between processes as pixel-serial streams of channel vectors
// (row-major pixels, one vec<T, C> per pixel). Every process is a template over
// config structs generated in defines.h:
//   CIN, COUT, H, W (input grid), HO, WO (output grid), STRIDE,
//   ROWS (line-buffer rows), LAG (rows and columns of look-ahead),
//   PO, PI (output / input channels computed per cycle; depthwise: PO channels, PI = 1),
//   REQUANT, LO, HI (requantization and clamp), and the in/out types.
// Integer semantics (docs/fpga.md): acc = bias + sum(w * x) exactly in 32 bits;
// out = clamp((acc * M + 2^(S-1)) >> S, LO, HI), or the raw accumulator.
#ifndef EDGEKIT_ENGINE_H
#define EDGEKIT_ENGINE_H

#include "defines.h"

namespace edgekit {

// One 4-bit x 8-bit product, bound to a DSP48 (the estimate counts one DSP per lane).
template <typename X_T>
inline product_t mul(weight_t w, X_T x) {
#pragma HLS INLINE
  product_t p = ap_int<4>(w) * x;
#pragma HLS BIND_OP variable=p op=mul impl=dsp
  return p;
}

// Requantize channel c's accumulator to the layer's output type, or hand it on raw
// (a raw layer's multiplier and shift arrays are placeholders and never read).
template <class CFG>
inline typename CFG::out_t finish(acc_t acc, const mult_t m[], const shift_t s[], int c) {
#pragma HLS INLINE
  if (!CFG::REQUANT) return typename CFG::out_t(acc);
  // |acc * M| < 2^46 and S <= 47 (checked by the generator), so 48 bits are exact.
  ap_int<48> p = acc;
  p *= ap_uint<15>(m[c]);
  const int sh = s[c];
  p += ap_int<48>(1) << (sh - 1);
  p >>= sh;  // arithmetic: floors like the reference
  if (p < CFG::LO) return typename CFG::out_t(CFG::LO);
  if (p > CFG::HI) return typename CFG::out_t(CFG::HI);
  return typename CFG::out_t(p);
}

// Slot of the row `off` rows from the centre row held in slot `centre` (|off| < ROWS).
template <int ROWS>
inline int row_slot(int centre, int off) {
#pragma HLS INLINE
  int slot = centre + off;
  if (slot < 0) slot += ROWS;
  if (slot >= ROWS) slot -= ROWS;
  return slot;
}

template <int ROWS>
inline int next_slot(int slot) {
#pragma HLS INLINE
  return slot + 1 == ROWS ? 0 : slot + 1;
}

// -1, 0 or +1 times d without a multiplier.
inline int tap_offset(int tap, int d) {
#pragma HLS INLINE
  return tap == 0 ? -d : (tap == 1 ? 0 : d);
}

// 1x1 convolution of one pixel: PO x PI MACs per cycle, (COUT/PO)*(CIN/PI) cycles.
template <class CFG, typename X_T>
void pointwise(const X_T x[CFG::CIN], typename CFG::out_t y[CFG::COUT], const weight_t w[CFG::COUT][CFG::CIN][1][1],
               const bias_t b[CFG::COUT], const mult_t m[], const shift_t s[]) {
#pragma HLS INLINE
  const int groups_in = CFG::CIN / CFG::PI;
  acc_t run[CFG::PO];
#pragma HLS ARRAY_PARTITION variable=run complete
  int og = 0, ig = 0;
  for (int t = 0; t < (CFG::COUT / CFG::PO) * groups_in; t++) {
#pragma HLS PIPELINE II=1
    for (int po = 0; po < CFG::PO; po++) {
#pragma HLS UNROLL
      const int o = og * CFG::PO + po;
      acc_t sum = ig == 0 ? acc_t(b[o]) : run[po];
      for (int pi = 0; pi < CFG::PI; pi++) {
#pragma HLS UNROLL
        const int i = ig * CFG::PI + pi;
        sum += mul(w[o][i][0][0], x[i]);
      }
      run[po] = sum;
      if (ig == groups_in - 1) y[o] = finish<CFG>(sum, m, s, o);
    }
    if (++ig == groups_in) {
      ig = 0;
      ++og;
    }
  }
}

// Write one pixel's channels into line-buffer row `slot`, LANES channels per cycle.
template <int LANES, int C, int W, int ROWS, typename LB_T, typename X_T>
void store_pixel(LB_T lb[ROWS][W][C], int slot, int x, const X_T src[C]) {
#pragma HLS INLINE
  for (int g = 0; g < C / LANES; g++) {
#pragma HLS PIPELINE II=1
    for (int l = 0; l < LANES; l++) {
#pragma HLS UNROLL
      lb[slot][x][g * LANES + l] = src[g * LANES + l];
    }
  }
}

// Full 3x3 window at centre (yc, xc) with tap spacing d, read from the line buffer:
// one column of taps per cycle (3 rows x PO x PI MACs), 3*(COUT/PO)*(CIN/PI) cycles.
template <class CFG, typename LB_T>
void window_full(LB_T lb[CFG::ROWS][CFG::W][CFG::CIN], int centre, int yc, int xc, int d,
                 typename CFG::out_t y[CFG::COUT], const weight_t w[CFG::COUT][CFG::CIN][3][3],
                 const bias_t b[CFG::COUT], const mult_t m[], const shift_t s[]) {
#pragma HLS INLINE
  const int groups_in = CFG::CIN / CFG::PI;
  acc_t run[CFG::PO];
#pragma HLS ARRAY_PARTITION variable=run complete
  int og = 0, ig = 0, tap = 0;
  for (int t = 0; t < (CFG::COUT / CFG::PO) * groups_in * 3; t++) {
#pragma HLS PIPELINE II=1
    const int xr = xc + tap_offset(tap, d);
    const bool col_ok = xr >= 0 && xr < CFG::W;
    LB_T px[3][CFG::PI];
#pragma HLS ARRAY_PARTITION variable=px complete dim=0
    for (int r = 0; r < 3; r++) {
#pragma HLS UNROLL
      const int off = tap_offset(r, d);
      const int yr = yc + off;
      const bool ok = col_ok && yr >= 0 && yr < CFG::H;
      const int slot = row_slot<CFG::ROWS>(centre, off);
      for (int pi = 0; pi < CFG::PI; pi++) {
#pragma HLS UNROLL
        px[r][pi] = ok ? lb[slot][xr][ig * CFG::PI + pi] : LB_T(0);
      }
    }
    for (int po = 0; po < CFG::PO; po++) {
#pragma HLS UNROLL
      const int o = og * CFG::PO + po;
      acc_t sum = (ig == 0 && tap == 0) ? acc_t(b[o]) : run[po];
      for (int r = 0; r < 3; r++) {
#pragma HLS UNROLL
        for (int pi = 0; pi < CFG::PI; pi++) {
#pragma HLS UNROLL
          sum += mul(w[o][ig * CFG::PI + pi][r][tap], px[r][pi]);
        }
      }
      run[po] = sum;
      if (ig == groups_in - 1 && tap == 2) y[o] = finish<CFG>(sum, m, s, o);
    }
    if (++tap == 3) {
      tap = 0;
      if (++ig == groups_in) {
        ig = 0;
        ++og;
      }
    }
  }
}

// Depthwise 3x3 window at centre (yc, xc) with tap spacing d (d = 1: plain depthwise;
// d from the offset conv: CoDeNet's square deformable window). 3 rows x PO channels
// per cycle, 3*(COUT/PO) cycles.
template <class CFG, typename LB_T>
void window_dw(LB_T lb[CFG::ROWS][CFG::W][CFG::COUT], int centre, int yc, int xc, int d,
               typename CFG::out_t y[CFG::COUT], const weight_t w[CFG::COUT][1][3][3], const bias_t b[CFG::COUT],
               const mult_t m[], const shift_t s[]) {
#pragma HLS INLINE
  acc_t run[CFG::PO];
#pragma HLS ARRAY_PARTITION variable=run complete
  int cg = 0, tap = 0;
  for (int t = 0; t < (CFG::COUT / CFG::PO) * 3; t++) {
#pragma HLS PIPELINE II=1
    const int xr = xc + tap_offset(tap, d);
    const bool col_ok = xr >= 0 && xr < CFG::W;
    for (int po = 0; po < CFG::PO; po++) {
#pragma HLS UNROLL
      const int c = cg * CFG::PO + po;
      acc_t sum = tap == 0 ? acc_t(b[c]) : run[po];
      for (int r = 0; r < 3; r++) {
#pragma HLS UNROLL
        const int off = tap_offset(r, d);
        const int yr = yc + off;
        const bool ok = col_ok && yr >= 0 && yr < CFG::H;
        const LB_T v = ok ? lb[row_slot<CFG::ROWS>(centre, off)][xr][c] : LB_T(0);
        sum += mul(w[c][0][r][tap], v);
      }
      run[po] = sum;
      if (tap == 2) y[c] = finish<CFG>(sum, m, s, c);
    }
    if (++tap == 3) {
      tap = 0;
      ++cg;
    }
  }
}

// ---------------------------------------------------------------- processes

// Pointwise (1x1) convolution, stride 1 or 2.
template <class CFG>
void conv_1x1(hls::stream<typename CFG::in_vec>& in, hls::stream<typename CFG::out_vec>& out,
              const weight_t w[CFG::COUT][CFG::CIN][1][1], const bias_t b[CFG::COUT], const mult_t m[],
              const shift_t s[]) {
  for (int y = 0; y < CFG::H; y++) {
    for (int x = 0; x < CFG::W; x++) {
      const typename CFG::in_vec v = in.read();
      if (y % CFG::STRIDE == 0 && x % CFG::STRIDE == 0) {
        typename CFG::out_vec o;
        pointwise<CFG>(v.d, o.d, w, b, m, s);
        out.write(o);
      }
    }
  }
}

// Full 3x3 convolution (pad 1, stride 1 or 2) over a 3-row line buffer.
// The loop runs LAG rows and columns past the image so that the window of the
// last pixels is complete; input pixels are stored before the window is read.
template <class CFG>
void conv_3x3(hls::stream<typename CFG::in_vec>& in, hls::stream<typename CFG::out_vec>& out,
              const weight_t w[CFG::COUT][CFG::CIN][3][3], const bias_t b[CFG::COUT], const mult_t m[],
              const shift_t s[]) {
  static typename CFG::in_t lb[CFG::ROWS][CFG::W][CFG::CIN];
  const int lanes = CFG::PI;
#pragma HLS ARRAY_PARTITION variable=lb complete dim=1
#pragma HLS ARRAY_RESHAPE variable=lb cyclic factor=lanes dim=3
  int slot = 0;
  for (int y = 0; y < CFG::H + CFG::LAG; y++) {
    for (int x = 0; x < CFG::W + CFG::LAG; x++) {
      if (y < CFG::H && x < CFG::W) {
        const typename CFG::in_vec v = in.read();
        store_pixel<lanes, CFG::CIN, CFG::W, CFG::ROWS>(lb, slot, x, v.d);
      }
      const int yc = y - CFG::LAG, xc = x - CFG::LAG;
      if (yc >= 0 && xc >= 0 && yc % CFG::STRIDE == 0 && xc % CFG::STRIDE == 0) {
        typename CFG::out_vec o;
        window_full<CFG>(lb, row_slot<CFG::ROWS>(slot, -CFG::LAG), yc, xc, 1, o.d, w, b, m, s);
        out.write(o);
      }
    }
    slot = next_slot<CFG::ROWS>(slot);
  }
}

// Depthwise 3x3 convolution (pad 1, stride 1 or 2) over a 3-row line buffer.
template <class CFG>
void dw_3x3(hls::stream<typename CFG::in_vec>& in, hls::stream<typename CFG::out_vec>& out,
            const weight_t w[CFG::COUT][1][3][3], const bias_t b[CFG::COUT], const mult_t m[], const shift_t s[]) {
  static typename CFG::in_t lb[CFG::ROWS][CFG::W][CFG::COUT];
  const int lanes = CFG::PO;
#pragma HLS ARRAY_PARTITION variable=lb complete dim=1
#pragma HLS ARRAY_RESHAPE variable=lb cyclic factor=lanes dim=3
  int slot = 0;
  for (int y = 0; y < CFG::H + CFG::LAG; y++) {
    for (int x = 0; x < CFG::W + CFG::LAG; x++) {
      if (y < CFG::H && x < CFG::W) {
        const typename CFG::in_vec v = in.read();
        store_pixel<lanes, CFG::COUT, CFG::W, CFG::ROWS>(lb, slot, x, v.d);
      }
      const int yc = y - CFG::LAG, xc = x - CFG::LAG;
      if (yc >= 0 && xc >= 0 && yc % CFG::STRIDE == 0 && xc % CFG::STRIDE == 0) {
        typename CFG::out_vec o;
        window_dw<CFG>(lb, row_slot<CFG::ROWS>(slot, -CFG::LAG), yc, xc, 1, o.d, w, b, m, s);
        out.write(o);
      }
    }
    slot = next_slot<CFG::ROWS>(slot);
  }
}

// Fused engine: 1x1 conv -> requantize -> 3-row line buffer -> depthwise 3x3 -> requantize.
template <class PW, class DW>
void engine_pw_dw(hls::stream<typename PW::in_vec>& in, hls::stream<typename DW::out_vec>& out,
                  const weight_t pw_w[PW::COUT][PW::CIN][1][1], const bias_t pw_b[PW::COUT], const mult_t pw_m[],
                  const shift_t pw_s[], const weight_t dw_w[DW::COUT][1][3][3], const bias_t dw_b[DW::COUT],
                  const mult_t dw_m[], const shift_t dw_s[]) {
  static typename DW::in_t lb[DW::ROWS][DW::W][DW::COUT];
  const int lanes = DW::PO;
#pragma HLS ARRAY_PARTITION variable=lb complete dim=1
#pragma HLS ARRAY_RESHAPE variable=lb cyclic factor=lanes dim=3
  int slot = 0;
  for (int y = 0; y < DW::H + DW::LAG; y++) {
    for (int x = 0; x < DW::W + DW::LAG; x++) {
      if (y < DW::H && x < DW::W) {
        const typename PW::in_vec v = in.read();
        typename PW::out_t mid[PW::COUT];
#pragma HLS ARRAY_PARTITION variable=mid complete
        pointwise<PW>(v.d, mid, pw_w, pw_b, pw_m, pw_s);
        store_pixel<lanes, DW::COUT, DW::W, DW::ROWS>(lb, slot, x, mid);
      }
      const int yc = y - DW::LAG, xc = x - DW::LAG;
      if (yc >= 0 && xc >= 0) {
        typename DW::out_vec o;
        window_dw<DW>(lb, row_slot<DW::ROWS>(slot, -DW::LAG), yc, xc, 1, o.d, dw_w, dw_b, dw_m, dw_s);
        out.write(o);
      }
    }
    slot = next_slot<DW::ROWS>(slot);
  }
}

// CoDeNet's deformable step on a line buffer of ROWS = 2*LAG + 1 rows (LAG = max(N, 1)):
// the offset conv reads the 3x3 window (d = 1) and is requantized to the dilation
// d in [0, N]; then the depthwise taps read rows yc-d, yc, yc+d and columns
// xc-d, xc, xc+d. The window of pixel (yc, xc) is computed once row yc+LAG,
// column xc+LAG has been stored, so every row and column it can touch is present.
template <class OFF, class DW, typename LB_T>
void deform_pixel(LB_T lb[DW::ROWS][DW::W][DW::COUT], int centre, int yc, int xc,
                  hls::stream<typename DW::out_vec>& out, const weight_t off_w[1][OFF::CIN][3][3],
                  const bias_t off_b[1], const mult_t off_m[], const shift_t off_s[],
                  const weight_t dw_w[DW::COUT][1][3][3], const bias_t dw_b[DW::COUT], const mult_t dw_m[],
                  const shift_t dw_s[]) {
#pragma HLS INLINE
  typename OFF::out_t dilation[1];
  window_full<OFF>(lb, centre, yc, xc, 1, dilation, off_w, off_b, off_m, off_s);
  typename DW::out_vec o;
  window_dw<DW>(lb, centre, yc, xc, int(dilation[0]), o.d, dw_w, dw_b, dw_m, dw_s);
  out.write(o);
}

// Fused engine without a 1x1 stage: line buffer -> offset conv -> deformable dw 3x3.
template <class OFF, class DW>
void engine_deform(hls::stream<typename DW::in_vec>& in, hls::stream<typename DW::out_vec>& out,
                   const weight_t off_w[1][OFF::CIN][3][3], const bias_t off_b[1], const mult_t off_m[],
                   const shift_t off_s[], const weight_t dw_w[DW::COUT][1][3][3], const bias_t dw_b[DW::COUT],
                   const mult_t dw_m[], const shift_t dw_s[]) {
  static typename DW::in_t lb[DW::ROWS][DW::W][DW::COUT];
  const int lanes = DW::PO;
#pragma HLS ARRAY_PARTITION variable=lb complete dim=1
#pragma HLS ARRAY_RESHAPE variable=lb cyclic factor=lanes dim=3
  int slot = 0;
  for (int y = 0; y < DW::H + DW::LAG; y++) {
    for (int x = 0; x < DW::W + DW::LAG; x++) {
      if (y < DW::H && x < DW::W) {
        const typename DW::in_vec v = in.read();
        store_pixel<lanes, DW::COUT, DW::W, DW::ROWS>(lb, slot, x, v.d);
      }
      const int yc = y - DW::LAG, xc = x - DW::LAG;
      if (yc >= 0 && xc >= 0) {
        deform_pixel<OFF, DW>(lb, row_slot<DW::ROWS>(slot, -DW::LAG), yc, xc, out, off_w, off_b, off_m, off_s,
                              dw_w, dw_b, dw_m, dw_s);
      }
    }
    slot = next_slot<DW::ROWS>(slot);
  }
}

// The full CoDeNet engine: 1x1 conv -> requantize -> line buffer of 2N+1 rows ->
// offset conv -> dilation -> deformable dw 3x3 -> requantize.
template <class PW, class OFF, class DW>
void engine_pw_deform(hls::stream<typename PW::in_vec>& in, hls::stream<typename DW::out_vec>& out,
                      const weight_t pw_w[PW::COUT][PW::CIN][1][1], const bias_t pw_b[PW::COUT],
                      const mult_t pw_m[], const shift_t pw_s[], const weight_t off_w[1][OFF::CIN][3][3],
                      const bias_t off_b[1], const mult_t off_m[], const shift_t off_s[],
                      const weight_t dw_w[DW::COUT][1][3][3], const bias_t dw_b[DW::COUT], const mult_t dw_m[],
                      const shift_t dw_s[]) {
  static typename DW::in_t lb[DW::ROWS][DW::W][DW::COUT];
  const int lanes = DW::PO;
#pragma HLS ARRAY_PARTITION variable=lb complete dim=1
#pragma HLS ARRAY_RESHAPE variable=lb cyclic factor=lanes dim=3
  int slot = 0;
  for (int y = 0; y < DW::H + DW::LAG; y++) {
    for (int x = 0; x < DW::W + DW::LAG; x++) {
      if (y < DW::H && x < DW::W) {
        const typename PW::in_vec v = in.read();
        typename PW::out_t mid[PW::COUT];
#pragma HLS ARRAY_PARTITION variable=mid complete
        pointwise<PW>(v.d, mid, pw_w, pw_b, pw_m, pw_s);
        store_pixel<lanes, DW::COUT, DW::W, DW::ROWS>(lb, slot, x, mid);
      }
      const int yc = y - DW::LAG, xc = x - DW::LAG;
      if (yc >= 0 && xc >= 0) {
        deform_pixel<OFF, DW>(lb, row_slot<DW::ROWS>(slot, -DW::LAG), yc, xc, out, off_w, off_b, off_m, off_s,
                              dw_w, dw_b, dw_m, dw_s);
      }
    }
    slot = next_slot<DW::ROWS>(slot);
  }
}

// Nearest 2x upsampling: each input row is sent twice, each pixel twice per row.
template <class CFG>
void upsample_2x(hls::stream<typename CFG::vec>& in, hls::stream<typename CFG::vec>& out) {
  static typename CFG::vec row[CFG::W];
  for (int y = 0; y < CFG::H; y++) {
    for (int x = 0; x < CFG::W; x++) {
#pragma HLS PIPELINE II=2
      const typename CFG::vec v = in.read();
      row[x] = v;
      out.write(v);
      out.write(v);
    }
    for (int x = 0; x < CFG::W; x++) {
#pragma HLS PIPELINE II=2
      const typename CFG::vec v = row[x];
      out.write(v);
      out.write(v);
    }
  }
}

// Channel routing (chains of concat / split / shuffle) is not a template: each
// chain becomes one generated function in routes.h with its channel map unrolled.

// A tensor read by two processes: copy every pixel to both.
template <class CFG>
void fork_2(hls::stream<typename CFG::vec>& in, hls::stream<typename CFG::vec>& a,
            hls::stream<typename CFG::vec>& b) {
  for (int p = 0; p < CFG::H * CFG::W; p++) {
#pragma HLS PIPELINE II=1
    const typename CFG::vec v = in.read();
    a.write(v);
    b.write(v);
  }
}

// A tensor nobody reads (e.g. an unused conv output): consume it so the stream empties.
template <class CFG>
void drain(hls::stream<typename CFG::vec>& in) {
  for (int p = 0; p < CFG::H * CFG::W; p++) {
#pragma HLS PIPELINE II=1
    in.read();
  }
}

// m_axi (CHW in memory) -> pixel stream, one channel value per cycle.
template <class CFG>
void read_input(const typename CFG::t image[CFG::C * CFG::H * CFG::W], hls::stream<typename CFG::vec>& out) {
  typename CFG::vec v;
  int p = 0, c = 0;
  for (int t = 0; t < CFG::C * CFG::H * CFG::W; t++) {
#pragma HLS PIPELINE II=1
    v.d[c] = image[c * CFG::H * CFG::W + p];
    if (++c == CFG::C) {
      out.write(v);
      c = 0;
      ++p;
    }
  }
}

// Pixel stream -> m_axi (CHW in memory), one channel value per cycle.
template <class CFG>
void write_output(hls::stream<typename CFG::vec>& in, typename CFG::t dst[CFG::C * CFG::H * CFG::W]) {
  typename CFG::vec v;
  int p = 0, c = 0;
  for (int t = 0; t < CFG::C * CFG::H * CFG::W; t++) {
#pragma HLS PIPELINE II=1
    if (c == 0) v = in.read();
    dst[c * CFG::H * CFG::W + p] = v.d[c];
    if (++c == CFG::C) {
      c = 0;
      ++p;
    }
  }
}

}  // namespace edgekit
#endif  // EDGEKIT_ENGINE_H
"""

FILES = {"edgekit_stream.h": STREAM_H, "engine.h": ENGINE_H}
