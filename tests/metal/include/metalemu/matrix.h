// simdgroup_matrix<T, 8, 8>: an 8x8 tile held by the 32 lanes of a simdgroup, two
// elements per lane, in the layout Apple GPUs use (and MLX's steel MMAFrag assumes):
// lane l holds row (q & 4) + (l / 2) % 4, columns (q & 2) * 2 + (l % 2) * 2 + {0, 1},
// q = l / 4. Loads and stores touch only the lane's own elements; multiply-accumulate
// is a collective that gathers the three tiles from all 32 lanes.
#pragma once

namespace metal {

namespace detail {
METAL_FUNC ushort2 mma_coord(uint lane) {
  uint q = lane / 4;
  ushort row = (q & 4) + (lane / 2) % 4;
  ushort col = (q & 2) * 2 + (lane % 2) * 2;
  return ushort2{row, col};
}
METAL_FUNC uint mma_lane() { return metalemu::lane()->thread_index_in_simdgroup; }
}  // namespace detail

template <class T, int Rows, int Cols>
struct simdgroup_matrix {
  static_assert(Rows == 8 && Cols == 8, "the emulator has 8x8 simdgroup matrices only");
  vec<T, 2> elems;

  simdgroup_matrix() = default;
  // MSL: a diagonal matrix with `d` on the diagonal.
  explicit simdgroup_matrix(T d) {
    ushort2 rc = detail::mma_coord(detail::mma_lane());
    elems[0] = rc.x == rc.y ? d : T(0);
    elems[1] = rc.x == rc.y + 1 ? d : T(0);
  }
  thread vec<T, 2>& thread_elements() { return elems; }
  const thread vec<T, 2>& thread_elements() const { return elems; }
};

template <class T, int R, int C>
METAL_FUNC simdgroup_matrix<T, R, C> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, R, C> m;
  m.elems = vec<T, 2>{value, value};
  return m;
}

// src points at element (origin.y, origin.x) of a row-major matrix with
// `elements_per_row` columns (any address space).
template <class T, int R, int C, class P>
METAL_FUNC void simdgroup_load(thread simdgroup_matrix<T, R, C>& d, P src,
                               ulong elements_per_row = C, ulong2 origin = ulong2{0, 0},
                               bool transpose = false) {
  ushort2 rc = detail::mma_coord(detail::mma_lane());
  for (int k = 0; k < 2; k++) {
    ulong r = rc.x, c = rc.y + k;
    if (transpose) {
      ulong t = r;
      r = c;
      c = t;
    }
    d.elems[k] = T(src[(origin.y + r) * elements_per_row + origin.x + c]);
  }
  uint32_t m;  // a simdgroup-wide operation on a GPU: keep lanes together
  metalemu::simd_exchange(nullptr, 0, &m);
}

template <class T, int R, int C, class P>
METAL_FUNC void simdgroup_store(thread const simdgroup_matrix<T, R, C>& s, P dst,
                                ulong elements_per_row = C, ulong2 origin = ulong2{0, 0},
                                bool transpose = false) {
  ushort2 rc = detail::mma_coord(detail::mma_lane());
  for (int k = 0; k < 2; k++) {
    ulong r = rc.x, c = rc.y + k;
    if (transpose) {
      ulong t = r;
      r = c;
      c = t;
    }
    dst[(origin.y + r) * elements_per_row + origin.x + c] = s.elems[k];
  }
  uint32_t m;
  metalemu::simd_exchange(nullptr, 0, &m);
}

// D = A * B + C, products and sums in float (Apple GPUs accumulate at least that well).
template <class TD, class TA, class TB, class TC, int R, int C>
METAL_FUNC void simdgroup_multiply_accumulate(thread simdgroup_matrix<TD, R, C>& d,
                                              thread const simdgroup_matrix<TA, R, C>& a,
                                              thread const simdgroup_matrix<TB, R, C>& b,
                                              thread const simdgroup_matrix<TC, R, C>& c) {
  struct Tiles {
    float a[2], b[2], c[2];
  } mine{{(float)a.elems[0], (float)a.elems[1]},
         {(float)b.elems[0], (float)b.elems[1]},
         {(float)c.elems[0], (float)c.elems[1]}};
  detail::Collective<Tiles> all(mine);
  if (all.active != 0xFFFFFFFFu) metalemu::fail("simdgroup_multiply_accumulate needs all 32 lanes");
  float A[8][8], B[8][8], Cm[8][8];
  for (uint l = 0; l < 32; l++) {
    Tiles t = all.at(l);
    ushort2 rc = detail::mma_coord(l);
    for (int k = 0; k < 2; k++) {
      A[rc.x][rc.y + k] = t.a[k];
      B[rc.x][rc.y + k] = t.b[k];
      Cm[rc.x][rc.y + k] = t.c[k];
    }
  }
  ushort2 rc = detail::mma_coord(all.lane);
  for (int k = 0; k < 2; k++) {
    float s = Cm[rc.x][rc.y + k];
    for (int j = 0; j < 8; j++) s += A[rc.x][j] * B[j][rc.y + k];
    d.elems[k] = TD(s);
  }
}

template <class TD, class TA, class TB, int R, int C>
METAL_FUNC void simdgroup_multiply(thread simdgroup_matrix<TD, R, C>& d,
                                   thread const simdgroup_matrix<TA, R, C>& a,
                                   thread const simdgroup_matrix<TB, R, C>& b) {
  simdgroup_matrix<TD, R, C> zero = make_filled_simdgroup_matrix<TD, R, C>(TD(0));
  simdgroup_multiply_accumulate(d, a, b, zero);
}

typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

}  // namespace metal
