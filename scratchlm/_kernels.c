/* Products with ggml-block weights on x86-64 CPUs with AVX2 and FMA: the fast path of kernels.py.

   Built at install as the extension module scratchlm._kernels (setup.py; optional: where it does not
   build or the CPU lacks AVX2, kernels.py uses its numba kernels: the same products, in float32).

   A weight row is a run of 32-weight chunks. Three paths:

     matvec (block types):  y[n][r] = W[r] . x[n] for up to 8 rows x[n], with integer dot products on the
                            raw quant values against x written as two 8-bit terms (quantize_x below; why
                            two terms and not llama.cpp's one: the comment above dot2). Each chunk of W is
                            decoded once for all N rows of x (Q6_K excepted, see SB_KERNEL).
     matvec (F16, BF16):    the same in float32, each chunk widened once for all N rows.
     dequantize:            `decode_<type>` turns a chunk into 32 float32 weights exactly as quant.py's NumPy
                            dequantization computes them (same formula, same float32 operations): a tile of
                            W for a BLAS matrix product (prefill, training).

   Rows are shared among the threads of a small pthread pool of our own (run_rows; OpenMP's pool measured
   12 ms a call on a busy machine). Measurements behind each choice: benchmarks/NOTES.md, "Quantized inference".
*/

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X86 1
#include <immintrin.h>
#else
#define HAVE_X86 0
#endif


/* ggml type ids (ggml.h) and their block geometry */
enum { F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12,
       Q5_K = 13, Q6_K = 14, BF16 = 30 };

static int block_geometry(int type, int *weights, int *bytes) {
    switch (type) {
    case F16: case BF16: *weights = 32; *bytes = 64; return 1;  /* 32 weights as a "block" */
    case Q4_0: *weights = 32; *bytes = 18; return 1;
    case Q4_1: *weights = 32; *bytes = 20; return 1;
    case Q5_0: *weights = 32; *bytes = 22; return 1;
    case Q5_1: *weights = 32; *bytes = 24; return 1;
    case Q8_0: *weights = 32; *bytes = 34; return 1;
    case Q2_K: *weights = 256; *bytes = 84; return 1;
    case Q3_K: *weights = 256; *bytes = 110; return 1;
    case Q4_K: *weights = 256; *bytes = 144; return 1;
    case Q5_K: *weights = 256; *bytes = 176; return 1;
    case Q6_K: *weights = 256; *bytes = 210; return 1;
    default: return 0;
    }
}

#if HAVE_X86
#define AVX2 __attribute__((target("avx2,fma,f16c"))) static inline
#define AVX2I __attribute__((target("avx2,fma,f16c"), always_inline)) static inline

AVX2 float fp16(const uint8_t *p) {  /* the little-endian fp16 at p */
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

AVX2 __m256 bytes_to_f32(__m128i v) {  /* the low 8 unsigned bytes of v -> 8 floats */
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
}

/* 16 bytes -> their 32 nibbles as floats: out[0..1] the low nibbles (weights 0-15), out[2..3] the high. */
AVX2 void nibbles_to_f32(__m128i v, __m256 out[4]) {
    const __m128i m = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
    out[0] = bytes_to_f32(lo);
    out[1] = bytes_to_f32(_mm_srli_si128(lo, 8));
    out[2] = bytes_to_f32(hi);
    out[3] = bytes_to_f32(_mm_srli_si128(hi, 8));
}

/* 8 bits of `bits` (bit k for lane k) -> 16.0f where set, 0 where clear: the 5th bit of Q5 weights. */
AVX2 __m256i bit16_lanes(uint32_t bits) {
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i b = _mm256_and_si256(_mm256_set1_epi32((int)bits), sel);
    return _mm256_and_si256(_mm256_cmpeq_epi32(b, sel), _mm256_set1_epi32(16));
}

AVX2 void q5_to_f32(const uint8_t *qh_p, const uint8_t *qs, __m256 out[4]) {
    /* 16 bytes of low nibbles + a u32 of 5th bits -> the 32 5-bit values as floats */
    uint32_t qh;
    memcpy(&qh, qh_p, 4);
    __m128i v = _mm_loadu_si128((const __m128i *)qs);
    const __m128i m = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
    __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int i = 0; i < 4; i++) {
        __m256i q = _mm256_or_si256(_mm256_cvtepu8_epi32(parts[i]), bit16_lanes(qh >> (8 * i)));
        out[i] = _mm256_cvtepi32_ps(q);
    }
}

/* --- chunk decoders: chunk c (32 weights) of a row starting at `row` ------------------------------- */

AVX2 void decode_q8_0(const uint8_t *row, long c, __m256 out[4]) {
    const uint8_t *b = row + 34 * c;  /* d | 32 x int8 ; d * q */
    __m256 d = _mm256_set1_ps(fp16(b));
    for (int i = 0; i < 4; i++)
        out[i] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * i)))));
}

AVX2 void decode_q4_0(const uint8_t *row, long c, __m256 out[4]) {
    const uint8_t *b = row + 18 * c;  /* d | 16 bytes of nibbles ; d * (q - 8) */
    float d = fp16(b);
    __m256 vd = _mm256_set1_ps(d), off = _mm256_set1_ps(-8.0f);
    nibbles_to_f32(_mm_loadu_si128((const __m128i *)(b + 2)), out);
    for (int i = 0; i < 4; i++) out[i] = _mm256_mul_ps(_mm256_add_ps(out[i], off), vd);
}

AVX2 void decode_q4_1(const uint8_t *row, long c, __m256 out[4]) {
    const uint8_t *b = row + 20 * c;  /* d | m | 16 bytes of nibbles ; d * q + m */
    __m256 vd = _mm256_set1_ps(fp16(b)), vm = _mm256_set1_ps(fp16(b + 2));
    nibbles_to_f32(_mm_loadu_si128((const __m128i *)(b + 4)), out);
    for (int i = 0; i < 4; i++) out[i] = _mm256_fmadd_ps(out[i], vd, vm);
}

AVX2 void decode_q5_0(const uint8_t *row, long c, __m256 out[4]) {
    const uint8_t *b = row + 22 * c;  /* d | qh u32 | 16 bytes ; d * (q - 16) */
    __m256 vd = _mm256_set1_ps(fp16(b)), off = _mm256_set1_ps(-16.0f);
    q5_to_f32(b + 2, b + 6, out);
    for (int i = 0; i < 4; i++) out[i] = _mm256_mul_ps(_mm256_add_ps(out[i], off), vd);
}

AVX2 void decode_q5_1(const uint8_t *row, long c, __m256 out[4]) {
    const uint8_t *b = row + 24 * c;  /* d | m | qh u32 | 16 bytes ; d * q + m */
    __m256 vd = _mm256_set1_ps(fp16(b)), vm = _mm256_set1_ps(fp16(b + 2));
    q5_to_f32(b + 4, b + 8, out);
    for (int i = 0; i < 4; i++) out[i] = _mm256_fmadd_ps(out[i], vd, vm);
}

/* Q4_K / Q5_K: the 6-bit scale and min of sub-block j from the 12 bytes at s */
static inline void scale_min_k4(const uint8_t *s, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

AVX2 void decode_q4_k(const uint8_t *row, long c, __m256 out[4]) {
    /* d | dmin | 12 bytes scales | 128 bytes: bytes 32i..32i+31 hold sub-block 2i (low nibbles) and
       2i+1 (high); value (d*sc) * q - (dmin*mn). Chunk c = sub-block j of super-block c/8. */
    const uint8_t *b = row + 144 * (c >> 3);
    int j = (int)(c & 7), sc, mn;
    scale_min_k4(b + 4, j, &sc, &mn);
    __m256 vs = _mm256_set1_ps(fp16(b) * (float)sc), vm = _mm256_set1_ps(fp16(b + 2) * (float)mn);
    const uint8_t *q = b + 16 + 32 * (j >> 1);
    __m256i v = _mm256_loadu_si256((const __m256i *)q);
    if (j & 1) v = _mm256_srli_epi16(v, 4);
    v = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
    __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
    __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int i = 0; i < 4; i++) out[i] = _mm256_fmsub_ps(bytes_to_f32(parts[i]), vs, vm);
}

AVX2 void decode_q5_k(const uint8_t *row, long c, __m256 out[4]) {
    /* d | dmin | 12 bytes scales | qh[32]: bit j of qh[l] is the 5th bit of weight l of sub-block j |
       128 bytes of low nibbles as Q4_K */
    const uint8_t *b = row + 176 * (c >> 3);
    int j = (int)(c & 7), sc, mn;
    scale_min_k4(b + 4, j, &sc, &mn);
    __m256 vs = _mm256_set1_ps(fp16(b) * (float)sc), vm = _mm256_set1_ps(fp16(b + 2) * (float)mn);
    __m256i v = _mm256_loadu_si256((const __m256i *)(b + 48 + 32 * (j >> 1)));
    if (j & 1) v = _mm256_srli_epi16(v, 4);
    v = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
    __m256i h = _mm256_loadu_si256((const __m256i *)(b + 16));  /* bit j of each byte -> 16 */
    __m256i bit = _mm256_set1_epi8((char)(1 << j));
    h = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, bit), bit), _mm256_set1_epi8(16));
    v = _mm256_or_si256(v, h);
    __m128i lo = _mm256_castsi256_si128(v), hi = _mm256_extracti128_si256(v, 1);
    __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int i = 0; i < 4; i++) out[i] = _mm256_fmsub_ps(bytes_to_f32(parts[i]), vs, vm);
}

AVX2 void decode_q6_k(const uint8_t *row, long c, __m256 out[4]) {
    /* ql[128] | qh[64] | 16 int8 scales | d. Chunk c of a super-block: half h = c/4, k = c%4: weight
       128h+32k+l has low bits ql[64h + 32(k&1) + l] (>> 4 when k >= 2) and top bits (qh[32h+l] >> 2k) & 3;
       value (d*scale[s]) * (q - 32), s = 8h + 2k + l/16 */
    const uint8_t *b = row + 210 * (c >> 3);
    int cc = (int)(c & 7), h = cc >> 2, k = cc & 3;
    __m256i lo = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32 * (k & 1)));
    if (k >= 2) lo = _mm256_srli_epi16(lo, 4);
    lo = _mm256_and_si256(lo, _mm256_set1_epi8(0x0F));
    __m256i hi = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
    hi = _mm256_and_si256(_mm256_srli_epi16(hi, 2 * k), _mm256_set1_epi8(3));
    __m256i q = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));  /* 6-bit values, < 64: no carry between bytes */
    float d = fp16(b + 208);
    int s = 8 * h + 2 * k;
    __m256 s0 = _mm256_set1_ps(d * (float)(int8_t)b[192 + s]), s1 = _mm256_set1_ps(d * (float)(int8_t)b[193 + s]);
    __m256 off = _mm256_set1_ps(-32.0f);
    __m128i a = _mm256_castsi256_si128(q), z = _mm256_extracti128_si256(q, 1);
    out[0] = _mm256_mul_ps(_mm256_add_ps(bytes_to_f32(a), off), s0);
    out[1] = _mm256_mul_ps(_mm256_add_ps(bytes_to_f32(_mm_srli_si128(a, 8)), off), s0);
    out[2] = _mm256_mul_ps(_mm256_add_ps(bytes_to_f32(z), off), s1);
    out[3] = _mm256_mul_ps(_mm256_add_ps(bytes_to_f32(_mm_srli_si128(z, 8)), off), s1);
}

AVX2 void decode_q2_k(const uint8_t *row, long c, __m256 out[4]) {
    /* 16 bytes of scales (low nibble) and mins (high) | 64 bytes: in half h, bits 2k..2k+1 of byte 32h+l
       are weight 32k+l | d | dmin; value (d*sc) * q - (dmin*mn), s = 8h + 2k + l/16 */
    const uint8_t *b = row + 84 * (c >> 3);
    int cc = (int)(c & 7), h = cc >> 2, k = cc & 3, s = 8 * h + 2 * k;
    __m256i q = _mm256_loadu_si256((const __m256i *)(b + 16 + 32 * h));
    q = _mm256_and_si256(_mm256_srli_epi16(q, 2 * k), _mm256_set1_epi8(3));
    float d = fp16(b + 80), dmin = fp16(b + 82);
    __m256 s0 = _mm256_set1_ps(d * (float)(b[s] & 15)), m0 = _mm256_set1_ps(dmin * (float)(b[s] >> 4));
    __m256 s1 = _mm256_set1_ps(d * (float)(b[s + 1] & 15)), m1 = _mm256_set1_ps(dmin * (float)(b[s + 1] >> 4));
    __m128i a = _mm256_castsi256_si128(q), z = _mm256_extracti128_si256(q, 1);
    out[0] = _mm256_fmsub_ps(bytes_to_f32(a), s0, m0);
    out[1] = _mm256_fmsub_ps(bytes_to_f32(_mm_srli_si128(a, 8)), s0, m0);
    out[2] = _mm256_fmsub_ps(bytes_to_f32(z), s1, m1);
    out[3] = _mm256_fmsub_ps(bytes_to_f32(_mm_srli_si128(z, 8)), s1, m1);
}

static inline int scale_k3(const uint8_t *s, int j) {  /* Q3_K: sub-block j's 6-bit scale, minus 32 */
    int lo = (s[j & 7] >> (4 * (j >> 3))) & 15;
    int hi = (s[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
    return (lo | (hi << 4)) - 32;
}

AVX2 void decode_q3_k(const uint8_t *row, long c, __m256 out[4]) {
    /* hmask[32] | 64 bytes low 2 bits as Q2_K | 12 bytes of 6-bit scales | d. Bit 4h+k of hmask[l] set:
       weight 32k+l of half h keeps q, clear: q - 4. value (d*(sc-32)) * q */
    const uint8_t *b = row + 110 * (c >> 3);
    int cc = (int)(c & 7), h = cc >> 2, k = cc & 3, s = 8 * h + 2 * k;
    __m256i q = _mm256_loadu_si256((const __m256i *)(b + 32 + 32 * h));
    q = _mm256_and_si256(_mm256_srli_epi16(q, 2 * k), _mm256_set1_epi8(3));
    __m256i hm = _mm256_loadu_si256((const __m256i *)b);
    __m256i bit = _mm256_set1_epi8((char)(1 << (4 * h + k)));
    __m256i clear = _mm256_andnot_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), bit), _mm256_set1_epi8(4));
    float d = fp16(b + 108);
    __m256 s0 = _mm256_set1_ps(d * (float)scale_k3(b + 96, s)), s1 = _mm256_set1_ps(d * (float)scale_k3(b + 96, s + 1));
    __m128i a = _mm256_castsi256_si128(q), z = _mm256_extracti128_si256(q, 1);
    __m128i ca = _mm256_castsi256_si128(clear), cz = _mm256_extracti128_si256(clear, 1);
    /* q - 4*(1-bit) as floats: (q) - (clear), both small unsigned bytes */
#define Q3(vq, vc, sc) _mm256_mul_ps(_mm256_sub_ps(bytes_to_f32(vq), bytes_to_f32(vc)), sc)
    out[0] = Q3(a, ca, s0);
    out[1] = Q3(_mm_srli_si128(a, 8), _mm_srli_si128(ca, 8), s0);
    out[2] = Q3(z, cz, s1);
    out[3] = Q3(_mm_srli_si128(z, 8), _mm_srli_si128(cz, 8), s1);
#undef Q3
}

AVX2 void decode_f16(const uint8_t *row, long c, __m256 out[4]) {
    const uint8_t *b = row + 64 * c;
    for (int i = 0; i < 4; i++) out[i] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 16 * i)));
}

AVX2 void decode_bf16(const uint8_t *row, long c, __m256 out[4]) {  /* bfloat16 = the top half of a float32 */
    const uint8_t *b = row + 64 * c;
    for (int i = 0; i < 4; i++)
        out[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(b + 16 * i))), 16));
}

AVX2 float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2 float hsum_max(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* --- the integer path of matvec ----------------------------------------------------------------------
   llama.cpp's method, with one change. Each row of x is first written as 8-bit integers per 32-weight
   chunk, and a chunk's dot product is then integer work on the raw quant values: `maddubs` multiplies 32
   unsigned weight bytes by 32 signed bytes and adds pairs (16 x int16), `madd` adds pairs again (8 x int32,
   lane i = weights 4i..4i+3), and only those 8 sums are converted to float and scaled. Offsets (Q4_0's -8,
   the mins) come from the sums of x over each 16 weights, once per chunk.

   The change: llama.cpp rounds x to one 8-bit term per chunk (x ~ d q, d = max|x| / 127 over 32 values),
   an error of up to 1/254 of the chunk's largest value, and a model's activations have a few large
   coordinates: on the default model that alone turns greedy "The capital of France is Paris." into
   "L'Etoile, la Marseillaise, ..." (llama.cpp answers the same). Here x ~ d q1 + (d/254) q2, the second
   term rounding what the first left, with d per group of 4 values (a lane of the dot products, so the
   scales cost one vector multiply per chunk): an error of at most 1/64516 of the group's largest value.
   The logits of the default model then agree with the float32 ones to 2e-4 of their scale (float16-like
   activations; one-term rounding: 4e-2). It costs one more maddubs/madd per chunk: ~17 instructions per
   32 weights where decoding to floats takes ~30. A third term (1/16.4M, logits within 3e-6) measured 0.76x
   the speed of two with 2 threads, so two it is (benchmarks/NOTES.md). */

AVX2 __m256 lanes(const float *dx) { return _mm256_loadu_ps(dx); }  /* a chunk's 8 activation scales */

AVX2 __m256i dot_u8_i8(__m256i u, __m256i s) {  /* 32 u8 x 32 s8 -> 8 int32 lane sums of 4 products */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* 32 unsigned weight bytes against a chunk of x (q1 at xq, q2 at xq + 32): 254 * (u . q1) + (u . q2), the
   dot product in units of d/254, as 8 int32 lanes (at most 4 * 63 * 127 * 255: no overflow) */
AVX2 __m256i dot2(__m256i u, const int8_t *xq) {  /* madd weighs q1's pair sums by 254 as it adds them */
    __m256i h1 = _mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)xq));
    __m256i h2 = _mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)(xq + 32)));
    return _mm256_add_epi32(_mm256_madd_epi16(h1, _mm256_set1_epi16(254)), _mm256_madd_epi16(h2, _mm256_set1_epi16(1)));
}

AVX2 __m256i nibbles32(__m128i v) {  /* 16 bytes -> 32 bytes: low nibbles (weights 0-15), then high (16-31) */
    const __m128i m = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

AVX2 __m256i q5_bytes(const uint8_t *qh_p, const uint8_t *qs) {  /* Q5: nibbles | 5th bits << 4 */
    uint32_t qh;
    memcpy(&qh, qh_p, 4);
    /* spread the 32 bits over 32 bytes: byte i gets bit i */
    const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), shuf);
    b = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(b, bit), bit), _mm256_set1_epi8(16));
    return _mm256_or_si256(nibbles32(_mm_loadu_si128((const __m128i *)qs)), b);
}

/* A chunk's weights as the integer dot products want them, decoded once for every row of x:
   u: 32 unsigned bytes (Q8_0: |w|, multiplied against x given w's sign from sg),
   s: the 8 lanes' weight scales, m0, m1: the offsets per 16 weights (times the sums of x over them). */
typedef struct {
    __m256i u, sg;
    __m256 s;
    float m0, m1;
} wchunk;

/* wdec_<type>(row, c, w): chunk c of a row */

AVX2 void wdec_q8_0(const uint8_t *row, long c, wchunk *w) {
    const uint8_t *b = row + 34 * c;
    w->sg = _mm256_loadu_si256((const __m256i *)(b + 2));
    w->u = _mm256_sign_epi8(w->sg, w->sg);  /* |w|, once for every row of x */
    w->s = _mm256_set1_ps(fp16(b));
    w->m0 = w->m1 = 0.0f;
}

AVX2 void wdec_q4_0(const uint8_t *row, long c, wchunk *w) {
    const uint8_t *b = row + 18 * c;  /* d * (q - 8) */
    float d = fp16(b);
    w->u = nibbles32(_mm_loadu_si128((const __m128i *)(b + 2)));
    w->s = _mm256_set1_ps(d);
    w->m0 = w->m1 = -8.0f * d;
}

AVX2 void wdec_q4_1(const uint8_t *row, long c, wchunk *w) {
    const uint8_t *b = row + 20 * c;  /* d * q + m */
    w->u = nibbles32(_mm_loadu_si128((const __m128i *)(b + 4)));
    w->s = _mm256_set1_ps(fp16(b));
    w->m0 = w->m1 = fp16(b + 2);
}

AVX2 void wdec_q5_0(const uint8_t *row, long c, wchunk *w) {
    const uint8_t *b = row + 22 * c;  /* d * (q - 16) */
    float d = fp16(b);
    w->u = q5_bytes(b + 2, b + 6);
    w->s = _mm256_set1_ps(d);
    w->m0 = w->m1 = -16.0f * d;
}

AVX2 void wdec_q5_1(const uint8_t *row, long c, wchunk *w) {
    const uint8_t *b = row + 24 * c;  /* d * q + m */
    w->u = q5_bytes(b + 4, b + 8);
    w->s = _mm256_set1_ps(fp16(b));
    w->m0 = w->m1 = fp16(b + 2);
}

AVX2 __m256 halves(float a, float b) {  /* lanes 0-3 = a (weights 0-15), lanes 4-7 = b (16-31) */
    return _mm256_setr_ps(a, a, a, a, b, b, b, b);
}

AVX2 void wdec_q2_k(const uint8_t *row, long c, wchunk *w) {
    const uint8_t *b = row + 84 * (c >> 3);  /* (d*sc) * q - (dmin*mn), scale and min per 16 */
    int cc = (int)(c & 7), h = cc >> 2, k = cc & 3, s = 8 * h + 2 * k;
    w->u = _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)(b + 16 + 32 * h)), 2 * k),
                            _mm256_set1_epi8(3));
    float d = fp16(b + 80), dmin = fp16(b + 82);
    w->s = halves(d * (float)(b[s] & 15), d * (float)(b[s + 1] & 15));
    w->m0 = -dmin * (float)(b[s] >> 4);
    w->m1 = -dmin * (float)(b[s + 1] >> 4);
}

AVX2 void wdec_q3_k(const uint8_t *row, long c, wchunk *w) {
    const uint8_t *b = row + 110 * (c >> 3);  /* (d*(sc-32)) * (q' - 4), q' = low 2 bits + 4 * hmask bit */
    int cc = (int)(c & 7), h = cc >> 2, k = cc & 3, s = 8 * h + 2 * k;
    __m256i q = _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)(b + 32 + 32 * h)), 2 * k),
                                 _mm256_set1_epi8(3));
    __m256i hm = _mm256_loadu_si256((const __m256i *)b), bit = _mm256_set1_epi8((char)(1 << (4 * h + k)));
    w->u = _mm256_or_si256(q, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), bit), _mm256_set1_epi8(4)));
    float d = fp16(b + 108), a0 = d * (float)scale_k3(b + 96, s), a1 = d * (float)scale_k3(b + 96, s + 1);
    w->s = halves(a0, a1);
    w->m0 = -4.0f * a0;
    w->m1 = -4.0f * a1;
}

/* one decoded chunk against one row's chunk of x (q1 q2 at xq, dx = the 8 lanes' d/254, xs = the sums of x
   over its two halves): acc += the 8 lane sums, scaled (float); macc += the offset terms (scalar).
   SIGNED (Q8_0) and OFFSET are constants where it is inlined. */
AVX2 void wdot(const wchunk *w, int SIGNED, int OFFSET, const int8_t *xq, const float *dx, const float *xs,
               __m256 *acc, float *macc) {
    __m256i x1 = _mm256_loadu_si256((const __m256i *)xq), x2 = _mm256_loadu_si256((const __m256i *)(xq + 32));
    __m256i u = w->u;
    if (SIGNED) {  /* signed x signed: |w| (unsigned) times each term of x with w's sign */
        x1 = _mm256_sign_epi8(x1, w->sg);
        x2 = _mm256_sign_epi8(x2, w->sg);
    }
    /* 254 * (u . q1) + (u . q2), in units of d/254 (at most 4 * 63 * 127 * 255: no overflow);
       madd weighs q1's pair sums by 254 as it adds them */
    __m256i p = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(u, x1), _mm256_set1_epi16(254)),
                                 _mm256_madd_epi16(_mm256_maddubs_epi16(u, x2), _mm256_set1_epi16(1)));
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(w->s, lanes(dx)), *acc);
    if (OFFSET) *macc += w->m0 * xs[0] + w->m1 * xs[1];
}

/* Super-block dots of the k-quants (256 weights = 8 chunks): the scales are unpacked once per super-block
   and each 32 bytes of packed weights are loaded once for the chunks that share them (measured: 2.1x on
   Q4_K, 1.6x on Q6_K and Q5_K over decoding chunk by chunk as Q2_K and Q3_K still do), and once for all N
   rows of x. sb_<type>(b, N, x of row 0 at this super-block (xq, dx, xs), the rows' strides, acc[N], macc[N]). */

/* The 12 bytes of 6-bit scales and mins of a Q4_K/Q5_K super-block -> 8 float scales (times d) and 8 float
   mins (times dmin), with 32-bit integer operations on all of them at once instead of byte by byte:
   bytes 0-3 / 4-7 hold scales / mins 0-3 (low 6 bits), bytes 8-11 the low 4 bits of scales 4-7 (low
   nibbles) and mins 4-7 (high nibbles), whose top 2 bits are the spare top bits of bytes 0-3 / 4-7. */
AVX2 void k4_scales(const uint8_t *s, float d, float dmin, float *sc, __m256 *mn) {
    uint32_t u[3];
    memcpy(u, s, 12);
    uint32_t v[4] = {u[0] & 0x3f3f3f3f, (u[2] & 0x0f0f0f0f) | ((u[0] >> 2) & 0x30303030),
                     u[1] & 0x3f3f3f3f, ((u[2] >> 4) & 0x0f0f0f0f) | ((u[1] >> 2) & 0x30303030)};
    __m256 vs = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)v)));        /* scales 0-7 */
    __m256 vm = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(v + 2))));  /* mins 0-7 */
    _mm256_storeu_ps(sc, _mm256_mul_ps(vs, _mm256_set1_ps(d)));
    *mn = _mm256_mul_ps(vm, _mm256_set1_ps(dmin));
}

/* the 8 chunks' sums of x (xs holds them per 16: 16 floats) */
AVX2 __m256 chunk_sums(const float *xs) {
    __m256 h = _mm256_hadd_ps(_mm256_loadu_ps(xs), _mm256_loadu_ps(xs + 8));  /* chunks 0 1 4 5 | 2 3 6 7 */
    return _mm256_permutevar8x32_ps(h, _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7));
}

/* two chunks' decoded weights (q0: sub-block 2i, q1: 2i+1, scales s0, s1) against every row of x */
AVX2I void sb_pair(__m256i q0, __m256i q1, __m256 s0, __m256 s1, long N, const int8_t *xq, const float *dx,
                   long sq, long sd, __m256 *acc) {
    for (long n = 0; n < N; n++) {
        const int8_t *q = xq + n * sq;
        const float *d = dx + n * sd;
        acc[n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot2(q0, q)), _mm256_mul_ps(s0, lanes(d)), acc[n]);
        acc[n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot2(q1, q + 64)), _mm256_mul_ps(s1, lanes(d + 8)), acc[n]);
    }
}

AVX2I void sb_q4_k(const uint8_t *b, long N, const int8_t *xq, const float *dx, const float *xs,
                   long sq, long sd, long ss, __m256 *acc, float *macc) {
    float sc[8];
    __m256 mn;
    k4_scales(b + 4, fp16(b), fp16(b + 2), sc, &mn);
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int i = 0; i < 4; i++) {  /* bytes 32i..32i+31: sub-block 2i (low nibbles), 2i+1 (high) */
        __m256i v = _mm256_loadu_si256((const __m256i *)(b + 16 + 32 * i));
        sb_pair(_mm256_and_si256(v, low4), _mm256_and_si256(_mm256_srli_epi16(v, 4), low4),
                _mm256_broadcast_ss(sc + 2 * i), _mm256_broadcast_ss(sc + 2 * i + 1), N, xq + 128 * i, dx + 16 * i, sq, sd, acc);
    }
    for (long n = 0; n < N; n++) macc[n] -= hsum(_mm256_mul_ps(mn, chunk_sums(xs + n * ss)));
}

AVX2I void sb_q5_k(const uint8_t *b, long N, const int8_t *xq, const float *dx, const float *xs,
                   long sq, long sd, long ss, __m256 *acc, float *macc) {
    float sc[8];
    __m256 mn;
    k4_scales(b + 4, fp16(b), fp16(b + 2), sc, &mn);
    const __m256i low4 = _mm256_set1_epi8(0x0F), sixteen = _mm256_set1_epi8(16);
    __m256i h = _mm256_loadu_si256((const __m256i *)(b + 16));  /* bit j of byte l: 5th bit, sub-block j */
    for (int i = 0; i < 4; i++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(b + 48 + 32 * i));
        __m256i b0 = _mm256_set1_epi8((char)(1 << (2 * i))), b1 = _mm256_set1_epi8((char)(1 << (2 * i + 1)));
        __m256i q0 = _mm256_or_si256(_mm256_and_si256(v, low4),
                                     _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, b0), b0), sixteen));
        __m256i q1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), low4),
                                     _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, b1), b1), sixteen));
        sb_pair(q0, q1, _mm256_broadcast_ss(sc + 2 * i), _mm256_broadcast_ss(sc + 2 * i + 1), N, xq + 128 * i, dx + 16 * i, sq, sd, acc);
    }
    for (long n = 0; n < N; n++) macc[n] -= hsum(_mm256_mul_ps(mn, chunk_sums(xs + n * ss)));
}

AVX2I void sb_q6_k(const uint8_t *b, long N, const int8_t *xq, const float *dx, const float *xs,
                   long sq, long sd, long ss, __m256 *acc, float *macc) {
    /* the 16 int8 scales times d, once: scale s of a chunk c is s = 2c (first 16 weights) and 2c + 1 */
    float f[16];
    __m128i sb = _mm_loadu_si128((const __m128i *)(b + 192));
    __m256 vd = _mm256_set1_ps(fp16(b + 208));
    __m256 f0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sb)), vd);
    __m256 f1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sb, 8))), vd);
    _mm256_storeu_ps(f, f0);
    _mm256_storeu_ps(f + 8, f1);
    const __m256i low4 = _mm256_set1_epi8(0x0F), three = _mm256_set1_epi8(3);
    for (int h = 0; h < 2; h++) {
        __m256i l0 = _mm256_loadu_si256((const __m256i *)(b + 64 * h));       /* k = 0 (low), 2 (high) */
        __m256i l1 = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32));  /* k = 1 (low), 3 (high) */
        __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
        __m256i lo[4] = {_mm256_and_si256(l0, low4), _mm256_and_si256(l1, low4),
                         _mm256_and_si256(_mm256_srli_epi16(l0, 4), low4), _mm256_and_si256(_mm256_srli_epi16(l1, 4), low4)};
        for (int k = 0; k < 4; k++) {
            int c = 4 * h + k;
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), three);
            __m256i q = _mm256_or_si256(lo[k], _mm256_slli_epi16(hi, 4));
            __m256 sc = _mm256_set_m128(_mm_broadcast_ss(f + 2 * c + 1), _mm_broadcast_ss(f + 2 * c));
            for (long n = 0; n < N; n++)
                acc[n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot2(q, xq + n * sq + 64 * c)),
                                         _mm256_mul_ps(sc, lanes(dx + n * sd + 8 * c)), acc[n]);
        }
    }
    /* the -32 offsets: 32 * sum over the 16 sub-blocks of scale * (sum of x) */
    for (long n = 0; n < N; n++)
        macc[n] -= 32.0f * hsum(_mm256_fmadd_ps(f0, _mm256_loadu_ps(xs + n * ss), _mm256_mul_ps(f1, _mm256_loadu_ps(xs + n * ss + 8))));
}

/* the largest |v| of each group of 4 lanes (0-3, 4-7), in every lane of its group */
AVX2 __m256 max4(__m256 v) {
    v = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
    v = _mm256_max_ps(v, _mm256_permute_ps(v, 0xB1));  /* swap neighbours */
    return _mm256_max_ps(v, _mm256_permute_ps(v, 0x4E));  /* swap pairs */
}

/* x [N, C] float32 -> per 32-value chunk: xq = q1[32] q2[32] (int8); per group of 4 values (a lane of the
   dot products) d = max|x| / 127 over the group, q1 = round(x / d), q2 = round((x - d q1) / (d / 254)),
   rounding half to even, and dx = d / 254 (8 per chunk); the sums of x over each 16 (float).
   kernels.round_activations is the same in NumPy. */
AVX2 void quantize_x(const float *x, long N, long C, int8_t *xq, float *dx, float *xs) {
    const __m256 c127 = _mm256_set1_ps(127.0f), c254 = _mm256_set1_ps(254.0f), zero = _mm256_setzero_ps();
    for (long i = 0; i < N * C / 32; i++) {
        const float *xc = x + 32 * i;
        int32_t t1[32], t2[32];
        __m256 v[4];
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_loadu_ps(xc + 8 * k);
            __m256 d = _mm256_div_ps(max4(v[k]), c127), d2 = _mm256_div_ps(d, c254);
            __m256 nz = _mm256_cmp_ps(d, zero, _CMP_GT_OQ), nz2 = _mm256_cmp_ps(d2, zero, _CMP_GT_OQ);
            __m256 id = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0f), d), nz);
            __m256 id2 = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(1.0f), d2), nz2);
            __m256 q1 = _mm256_round_ps(_mm256_mul_ps(v[k], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m256 r = _mm256_sub_ps(v[k], _mm256_mul_ps(q1, d));  /* what q1 leaves */
            _mm256_storeu_si256((__m256i *)(t1 + 8 * k), _mm256_cvtps_epi32(q1));
            _mm256_storeu_si256((__m256i *)(t2 + 8 * k), _mm256_cvtps_epi32(_mm256_mul_ps(r, id2)));
            float dl[8];
            _mm256_storeu_ps(dl, d2);
            dx[8 * i + 2 * k] = dl[0];      /* lanes of the dot products: weights 4l..4l+3 -> group l */
            dx[8 * i + 2 * k + 1] = dl[4];
        }
        for (int k = 0; k < 32; k++) {
            xq[64 * i + k] = (int8_t)t1[k];
            xq[64 * i + 32 + k] = (int8_t)(t2[k] > 127 ? 127 : t2[k] < -127 ? -127 : t2[k]);
        }
        xs[2 * i] = hsum(_mm256_add_ps(v[0], v[1]));
        xs[2 * i + 1] = hsum(_mm256_add_ps(v[2], v[3]));
    }
}

/* --- the kernels, one copy per type -----------------------------------------------------------------
   Each runs on a range of weight rows [lo, hi), so that the pool below can share rows among threads.
   matvec (F16, BF16):  out[n*R + r] = W[r] . x[n] for n < N (N <= 8), x float32 [N, C].
   matvec8 (blocks):    the same from x as two 8-bit terms (xq, dx, xs; see quantize_x).
   dequant:             out[r*C .. r*C+C) = W[r]. */

typedef struct {
    const uint8_t *raw;
    long rows, row_bytes, chunks, N;
    const float *x;    /* matvec */
    const int8_t *xq;  /* matvec8 */
    const float *dx;
    const float *xs;
    float *out;
} args_t;

typedef void (*rows_fn)(const void *, long, long);  /* work on rows [lo, hi) of a job */

#define FLOAT_MATVEC(T, DECODE)                                                                                  \
    __attribute__((target("avx2,fma,f16c"))) static void matvec_##T(const void *va, long lo, long hi) { \
        const args_t *a = va;    \
        long C = 32 * a->chunks;                                                                            \
        for (long r = lo; r < hi; r++) {                                                                    \
            const uint8_t *row = a->raw + r * a->row_bytes;                                                 \
            __m256 acc[8], w[4];                                                                            \
            for (long n = 0; n < a->N; n++) acc[n] = _mm256_setzero_ps();                                   \
            for (long c = 0; c < a->chunks; c++) {                                                          \
                DECODE(row, c, w);                                                                          \
                for (long n = 0; n < a->N; n++) {                                                           \
                    const float *xc = a->x + n * C + 32 * c;                                                \
                    __m256 p = _mm256_mul_ps(w[0], _mm256_loadu_ps(xc));                                    \
                    p = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xc + 8), p);                                  \
                    __m256 q = _mm256_mul_ps(w[2], _mm256_loadu_ps(xc + 16));                               \
                    q = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xc + 24), q);                                 \
                    acc[n] = _mm256_add_ps(acc[n], _mm256_add_ps(p, q));                                    \
                }                                                                                           \
            }                                                                                               \
            for (long n = 0; n < a->N; n++) a->out[n * a->rows + r] = hsum(acc[n]);                         \
        }                                                                                                   \
    }

#define DEQUANT(T, DECODE)                                                                                  \
    __attribute__((target("avx2,fma,f16c"))) static void dequant_##T(const void *va, long lo, long hi) { \
        const args_t *a = va;   \
        for (long r = lo; r < hi; r++) {                                                                    \
            const uint8_t *row = a->raw + r * a->row_bytes;                                                 \
            float *o = a->out + r * 32 * a->chunks;                                                         \
            __m256 w[4];                                                                                    \
            for (long c = 0; c < a->chunks; c++) {                                                          \
                DECODE(row, c, w);                                                                          \
                for (int i = 0; i < 4; i++) _mm256_storeu_ps(o + 32 * c + 8 * i, w[i]);                    \
            }                                                                                               \
        }                                                                                                   \
    }

/* The integer kernels decode each chunk (or super-block) of a weight row once and take its dot product
   with every row of x before the next, instead of decoding the row again for each row of x: a batched
   decode step (serve) or a short prefill pays the decode once per weight, not N times. Each output
   still sums its chunks in the same order whatever N is, so a row of a batch equals the lone product bit
   for bit. rows8_<type> is inlined twice: N = 1 (decode: the accumulators stay in registers) and any N. */
#define INT_KERNEL(T, SIGNED, OFFSET)                                                                       \
    AVX2I void rows8_##T(const args_t *a, long lo, long hi, long N) {                                       \
        long sq = 64 * a->chunks, sd = 8 * a->chunks, ss = 2 * a->chunks;                                  \
        for (long r = lo; r < hi; r++) {                                                                    \
            const uint8_t *row = a->raw + r * a->row_bytes;                                                 \
            __m256 acc[8];                                                                                  \
            float macc[8];                                                                                  \
            for (long n = 0; n < N; n++) { acc[n] = _mm256_setzero_ps(); macc[n] = 0.0f; }                 \
            for (long c = 0; c < a->chunks; c++) {                                                          \
                wchunk w;                                                                                   \
                wdec_##T(row, c, &w);                                                                       \
                for (long n = 0; n < N; n++)                                                                \
                    wdot(&w, SIGNED, OFFSET, a->xq + n * sq + 64 * c, a->dx + n * sd + 8 * c,               \
                         a->xs + n * ss + 2 * c, &acc[n], &macc[n]);                                        \
            }                                                                                               \
            for (long n = 0; n < N; n++) a->out[n * a->rows + r] = hsum(acc[n]) + macc[n];                 \
        }                                                                                                   \
    }                                                                                                       \
    __attribute__((target("avx2,fma,f16c"))) static void matvec8_##T(const void *va, long lo, long hi) { \
        const args_t *a = va;                                                                               \
        if (a->N == 1) rows8_##T(a, lo, hi, 1); else rows8_##T(a, lo, hi, a->N);                            \
    }

#define SB_KERNEL(T, BYTES, ROWWISE)                                                                               \
    AVX2I void rows8_##T(const args_t *a, long lo, long hi, long N) {                                       \
        long sq = 64 * a->chunks, sd = 8 * a->chunks, ss = 2 * a->chunks, nsb = a->chunks / 8;             \
        for (long r = lo; r < hi; r++) {                                                                    \
            const uint8_t *row = a->raw + r * a->row_bytes;                                                 \
            __m256 acc[8];                                                                                  \
            float macc[8];                                                                                  \
            for (long n = 0; n < N; n++) { acc[n] = _mm256_setzero_ps(); macc[n] = 0.0f; }                 \
            if (ROWWISE)  /* the row again for each row of x (the order of sums is the same) */            \
                for (long n = 0; n < N; n++)                                                                \
                    for (long i = 0; i < nsb; i++)                                                          \
                        sb_##T(row + BYTES * i, 1, a->xq + n * sq + 512 * i, a->dx + n * sd + 64 * i,       \
                               a->xs + n * ss + 16 * i, sq, sd, ss, acc + n, macc + n);                      \
            else                                                                                            \
                for (long i = 0; i < nsb; i++)                                                              \
                    sb_##T(row + BYTES * i, N, a->xq + 512 * i, a->dx + 64 * i, a->xs + 16 * i, sq, sd, ss, acc, macc); \
            for (long n = 0; n < N; n++) a->out[n * a->rows + r] = hsum(acc[n]) + macc[n];                 \
        }                                                                                                   \
    }                                                                                                       \
    __attribute__((target("avx2,fma,f16c"))) static void matvec8_##T(const void *va, long lo, long hi) { \
        const args_t *a = va;                                                                               \
        if (a->N == 1) rows8_##T(a, lo, hi, 1); else rows8_##T(a, lo, hi, a->N);                            \
    }

/* Q6_K keeps the row-by-row order: decoding it once for 8 rows of x measured 0.8-0.9x on [4096, 4096]
   (1.5x on [1536, 512]), its 4 decoded registers and 8 accumulators outgrowing the 16 vector registers */
SB_KERNEL(q4_k, 144, 0)
SB_KERNEL(q5_k, 176, 0)
SB_KERNEL(q6_k, 210, 1)
INT_KERNEL(q8_0, 1, 0)
INT_KERNEL(q4_0, 0, 1)
INT_KERNEL(q4_1, 0, 1)
INT_KERNEL(q5_0, 0, 1)
INT_KERNEL(q5_1, 0, 1)
INT_KERNEL(q2_k, 0, 1)
INT_KERNEL(q3_k, 0, 1)
DEQUANT(q8_0, decode_q8_0)
DEQUANT(q4_0, decode_q4_0)
DEQUANT(q4_1, decode_q4_1)
DEQUANT(q5_0, decode_q5_0)
DEQUANT(q5_1, decode_q5_1)
DEQUANT(q2_k, decode_q2_k)
DEQUANT(q3_k, decode_q3_k)
DEQUANT(q4_k, decode_q4_k)
DEQUANT(q5_k, decode_q5_k)
DEQUANT(q6_k, decode_q6_k)
DEQUANT(f16, decode_f16)
DEQUANT(bf16, decode_bf16)
FLOAT_MATVEC(f16, decode_f16)
FLOAT_MATVEC(bf16, decode_bf16)

/* matvec (the integer one for block types), dequant */
static int lookup(int type, rows_fn *mv, rows_fn *dq, int *integer) {
    *integer = 1;
    switch (type) {
#define CASE(ID, T) case ID: *mv = matvec8_##T; *dq = dequant_##T; return 1;
    CASE(Q8_0, q8_0) CASE(Q4_0, q4_0) CASE(Q4_1, q4_1) CASE(Q5_0, q5_0) CASE(Q5_1, q5_1)
    CASE(Q2_K, q2_k) CASE(Q3_K, q3_k) CASE(Q4_K, q4_k) CASE(Q5_K, q5_k) CASE(Q6_K, q6_k)
#undef CASE
    case F16: *mv = matvec_f16; *dq = dequant_f16; *integer = 0; return 1;
    case BF16: *mv = matvec_bf16; *dq = dequant_bf16; *integer = 0; return 1;
    default: return 0;
    }
}

static int cpu_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

/* --- the thread pool ------------------------------------------------------------------------------------
   Why not OpenMP: a parallel region ends at a barrier that waits for every thread, so when another process
   holds the second core, each of the ~150 calls of a decode step waits for a descheduled thread (measured:
   12 ms per call instead of 0.2 ms on this 2-core machine under load). Here the caller works through the
   rows itself, chunk by chunk from a shared counter, and waits only for the workers that took a chunk;
   a worker that wakes too late finds no chunk left and goes back to waiting.

   Protocol (gen: even = a job is open, odd = the caller is writing the next one):
   caller:  gen++ (odd); wait until no worker is in; write the job; gen++ (even); take chunks; wait until
            no worker is in.
   worker:  g = gen (even, new); in++; if gen != g { in--; retry } else take chunks; in--.
   Idle workers spin briefly (the next call of a decode step comes within microseconds), then sleep. */

#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>

#define MAX_THREADS 64
#define SPIN_ROUNDS 20000 /* ~50-100 us of pause instructions before a worker sleeps */

static struct {
    pthread_mutex_t submit;       /* one caller at a time (others run their job alone) */
    pthread_mutex_t sleep_lock;
    pthread_cond_t wake;
    atomic_ulong gen;
    atomic_long next;             /* the next row to take */
    atomic_int in;                /* workers inside the current job */
    atomic_int sleepers;
    rows_fn fn;
    const void *args;
    long rows, chunk;
    atomic_int spin;              /* pause rounds a worker spins after this job before it sleeps */
    int n_threads, started;
    pid_t pid;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static void take_chunks(void) {
    long i;
    while ((i = atomic_fetch_add(&pool.next, pool.chunk)) < pool.rows) {
        long hi = i + pool.chunk < pool.rows ? i + pool.chunk : pool.rows;
        pool.fn(pool.args, i, hi);
    }
}

static void *worker(void *unused) {
    (void)unused;
    unsigned long seen = atomic_load(&pool.gen);
    for (;;) {
        unsigned long g;
        int spins = 0;
        int spin_rounds = atomic_load(&pool.spin);
        while (((g = atomic_load(&pool.gen)) == seen || (g & 1)) && spins < spin_rounds) {
            _mm_pause();
            spins++;
        }
        if (g == seen || (g & 1)) {  /* nothing new for a while: sleep until a caller wakes us */
            pthread_mutex_lock(&pool.sleep_lock);
            atomic_fetch_add(&pool.sleepers, 1);
            while ((g = atomic_load(&pool.gen)) == seen || (g & 1)) pthread_cond_wait(&pool.wake, &pool.sleep_lock);
            atomic_fetch_sub(&pool.sleepers, 1);
            pthread_mutex_unlock(&pool.sleep_lock);
        }
        atomic_fetch_add(&pool.in, 1);
        if (atomic_load(&pool.gen) == g) take_chunks();
        atomic_fetch_sub(&pool.in, 1);
        seen = g;
    }
    return NULL;
}

static int default_threads(void) {
    const char *e = getenv("SCRATCHLM_THREADS");
    if (!e || !*e) e = getenv("OMP_NUM_THREADS");  /* what `make test` and BLAS users already set */
    long n = e && *e ? strtol(e, NULL, 10) : sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : (int)n;
}

static void start_pool(void) {  /* called with pool.submit held */
    if (pool.started && pool.pid == getpid()) return;
    pool.pid = getpid();  /* after a fork the workers are gone: start new ones */
    if (!pool.n_threads) pool.n_threads = default_threads();
    pool.started = 1;
    for (int t = 1; t < pool.n_threads; t++) {
        pthread_t th;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&th, &at, worker, NULL)) pool.n_threads = t;  /* fewer threads: still correct */
        pthread_attr_destroy(&at);
    }
}

/* fn over rows [0, rows), in chunks, by the caller and any worker that joins in. spin: whether the workers
   should spin for the next job (decode steps: the next call comes within microseconds) or sleep at once
   (a tile dequantized for BLAS: BLAS's own threads need the cores next) */
static void run_rows(rows_fn fn, const void *a, long rows, long chunk, int spin) {
    if (rows <= 0) return;
    if (pthread_mutex_trylock(&pool.submit) != 0) {  /* another Python thread is using the pool: go alone */
        fn(a, 0, rows);
        return;
    }
    start_pool();
    if (pool.n_threads < 2 || rows <= chunk) {
        pthread_mutex_unlock(&pool.submit);
        fn(a, 0, rows);
        return;
    }
    atomic_fetch_add(&pool.gen, 1);  /* odd: closed while the job is written */
    while (atomic_load(&pool.in)) _mm_pause();
    pool.fn = fn;
    pool.args = a;
    pool.rows = rows;
    pool.chunk = chunk;
    atomic_store(&pool.spin, spin ? SPIN_ROUNDS : 0);
    atomic_store(&pool.next, 0);
    atomic_fetch_add(&pool.gen, 1);  /* even: open */
    if (atomic_load(&pool.sleepers)) {
        pthread_mutex_lock(&pool.sleep_lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.sleep_lock);
    }
    take_chunks();
    while (atomic_load(&pool.in)) _mm_pause();  /* only workers that are inside this job */
    pthread_mutex_unlock(&pool.submit);
}

/* rows per chunk: one contiguous share per thread (each streams its own region, which the hardware
   prefetchers follow best), in pieces of at most 256 KB. Measured on weights streamed from memory, 2 threads,
   against 64 KB pieces: 8 KB pieces 0.66-0.78x; 256 KB pieces 1.05-1.08x on large matrices but 0.70x on
   a 207 KB one (all of it on one thread); these shares 0.97-1.13x. Software prefetching of the rows ahead
   measured no gain (0.97-1.08x) and is not done. */
static long chunk_rows(long row_bytes, long rows) {
    int t = pool.n_threads ? pool.n_threads : default_threads();
    long share = (rows + t - 1) / t, cap = (256 << 10) / (row_bytes ? row_bytes : 1);
    long c = share < cap ? share : cap;
    return c < 1 ? 1 : c;
}

/* --- two decode-step ops, for the call count ------------------------------------------------------------
   Decoding one token runs each op on a few hundred numbers, so NumPy's ~1-3 us per call, not arithmetic,
   is the cost: RMSNorm is 7 NumPy calls, attention over the cache about 12 and SwiGLU 5, per layer. These compute
   what ops.rms_norm and ops.attention compute (same float32 formula, summation order aside), in one call
   each; tests/test_kernels.py holds them to the NumPy versions. */

typedef struct {
    const float *x, *w, *q, *k, *v;
    float *out;
    long D, Hd, S, G, k_stride, v_stride;
    float eps, scale;
} op_t;

AVX2 float dot_f32(const float *a, const float *b, long n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    long i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    float t = hsum(_mm256_add_ps(s0, s1));
    for (; i < n; i++) t += a[i] * b[i];
    return t;
}

/* exp(x) for 8 floats: 2^(x log2 e) = 2^n * 2^f, n = round(x log2 e), 2^f from a degree-6 polynomial on
   f in [-1/2, 1/2] (relative error ~2e-7); inputs clamped to [-87, 88] (below: ~0; silu and the
   softmax only need that) */
AVX2 __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
    __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_sub_ps(t, n);  /* in [-0.5, 0.5] */
    /* 2^f = e^(f ln 2): Taylor coefficients of e^y in y = f ln 2, folded into powers of f */
    __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* rows [lo, hi) of gate_up [N, 2F]: out [N, F] = silu(gate) * up = gate * up / (1 + exp(-gate)) */
__attribute__((target("avx2,fma,f16c"))) static void swiglu_rows(const void *vo, long lo, long hi) {
    const op_t *o = vo;
    long F = o->D;
    for (long r = lo; r < hi; r++) {
        const float *g = o->x + r * 2 * F, *u = g + F;
        float *y = o->out + r * F;
        long i = 0;
        for (; i + 8 <= F; i += 8) {
            __m256 gv = _mm256_loadu_ps(g + i);
            __m256 den = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
            _mm256_storeu_ps(y + i, _mm256_div_ps(_mm256_mul_ps(gv, _mm256_loadu_ps(u + i)), den));
        }
        for (; i < F; i++) y[i] = g[i] * u[i] / (1.0f + expf(-g[i]));
    }
}

/* rows [lo, hi) of x [N, D]: out = x * (1 / sqrt(mean(x^2) + eps)) * w */
__attribute__((target("avx2,fma,f16c"))) static void rms_rows(const void *vo, long lo, long hi) {
    const op_t *o = vo;
    for (long r = lo; r < hi; r++) {
        const float *x = o->x + r * o->D;
        float *y = o->out + r * o->D;
        __m256 rv = _mm256_set1_ps(1.0f / sqrtf(dot_f32(x, x, o->D) / (float)o->D + o->eps));
        long i = 0;
        for (; i + 8 <= o->D; i += 8)
            _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv), _mm256_loadu_ps(o->w + i)));
        for (; i < o->D; i++) y[i] = x[i] * _mm256_cvtss_f32(rv) * o->w[i];
    }
}

/* query heads [lo, hi): out[h] = softmax(q[h] . k[h/G, :S] * scale) @ v[h/G, :S]; k, v rows Hd apart,
   heads k_stride / v_stride apart (the cache's [K, S_max, Hd]) */
__attribute__((target("avx2,fma,f16c"))) static void attend_heads(const void *vo, long lo, long hi) {
    const op_t *o = vo;
    float *p = PyMem_RawMalloc(sizeof(float) * (size_t)(o->S > 0 ? o->S : 1));
    if (!p) {  /* no memory for the scores: NaN rather than a wrong answer */
        for (long i = lo * o->Hd; i < hi * o->Hd; i++) o->out[i] = NAN;
        return;
    }
    long Hd = o->Hd;
    for (long h = lo; h < hi; h++) {
        const float *q = o->q + h * Hd, *k = o->k + (h / o->G) * o->k_stride, *v = o->v + (h / o->G) * o->v_stride;
        float m = -INFINITY, l = 0.0f;
        for (long s = 0; s < o->S; s++) {
            p[s] = dot_f32(q, k + s * Hd, Hd) * o->scale;
            if (p[s] > m) m = p[s];
        }
        for (long s = 0; s < o->S; s++) {
            p[s] = expf(p[s] - m);
            l += p[s];
        }
        float *y = o->out + h * Hd;
        for (long i = 0; i < Hd; i++) y[i] = 0.0f;
        for (long s = 0; s < o->S; s++) {
            __m256 ps = _mm256_set1_ps(p[s] / l);
            const float *vs = v + s * Hd;
            long i = 0;
            for (; i + 8 <= Hd; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(ps, _mm256_loadu_ps(vs + i), _mm256_loadu_ps(y + i)));
            for (; i < Hd; i++) y[i] += p[s] / l * vs[i];
        }
    }
    PyMem_RawFree(p);
}
#else
static int cpu_ok(void) { return 0; }
#endif

/* --- Python entry points ---------------------------------------------------------------------------- */

/* The buffers come from kernels.py, which passes C-contiguous arrays of the right dtypes and sizes; the
   checks here guard the memory this code touches all the same. */
static int get_buffer(PyObject *o, Py_buffer *b, int writable, const char *what) {
    if (PyObject_GetBuffer(o, b, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        PyErr_Format(PyExc_ValueError, "_kernels: %s must be a C-contiguous%s buffer", what, writable ? " writable" : "");
        return 0;
    }
    return 1;
}

static PyObject *py_matvec(PyObject *self, PyObject *args) {
    int type;
    long rows, cols;
    PyObject *ro, *xo, *oo;
    (void)self;
    if (!PyArg_ParseTuple(args, "iOllOO", &type, &ro, &rows, &cols, &xo, &oo)) return NULL;
#if HAVE_X86
    rows_fn mv, dq;
    int bw, bb, integer;
    if (!lookup(type, &mv, &dq, &integer) || !block_geometry(type, &bw, &bb) || cols <= 0 || cols % bw || rows < 0) {
        PyErr_Format(PyExc_ValueError, "_kernels.matvec: unsupported type %d or shape [%ld, %ld]", type, rows, cols);
        return NULL;
    }
    Py_buffer r, x, o;
    if (!get_buffer(ro, &r, 0, "raw")) return NULL;
    if (!get_buffer(xo, &x, 0, "x")) { PyBuffer_Release(&r); return NULL; }
    if (!get_buffer(oo, &o, 1, "out")) { PyBuffer_Release(&r); PyBuffer_Release(&x); return NULL; }
    long row_bytes = cols / bw * bb, N = (long)(x.len / (4 * cols)), chunks = cols / 32;
    if (r.len != rows * row_bytes || x.len != N * cols * 4 || N < 1 || N > 8 || o.len != N * rows * 4) {
        PyErr_SetString(PyExc_ValueError, "_kernels.matvec: buffer sizes do not match the shapes");
    } else {
        args_t a = {(const uint8_t *)r.buf, rows, row_bytes, chunks, N, (const float *)x.buf, NULL, NULL, NULL, (float *)o.buf};
        void *tmp = integer ? PyMem_RawMalloc((size_t)(2 * N * cols + N * chunks * 32 + N * chunks * 8)) : NULL;
        if (integer && !tmp) {
            PyErr_NoMemory();
        } else {
            Py_BEGIN_ALLOW_THREADS
            if (integer) {  /* block types: x as two 8-bit terms, integer dot products */
                int8_t *xq = (int8_t *)tmp;
                float *dx = (float *)(xq + 2 * N * cols);
                float *xs = dx + 8 * N * chunks;
                quantize_x((const float *)x.buf, N, cols, xq, dx, xs);
                a.xq = xq; a.dx = dx; a.xs = xs;
            }
            run_rows(mv, &a, rows, chunk_rows(row_bytes, rows), 1);
            Py_END_ALLOW_THREADS
            PyMem_RawFree(tmp);
        }
    }
    PyBuffer_Release(&r); PyBuffer_Release(&x); PyBuffer_Release(&o);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
#else
    PyErr_SetString(PyExc_RuntimeError, "_kernels: built without AVX2 kernels");
    return NULL;
#endif
}

static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    int type;
    long rows, cols;
    PyObject *ro, *oo;
    (void)self;
    if (!PyArg_ParseTuple(args, "iOllO", &type, &ro, &rows, &cols, &oo)) return NULL;
#if HAVE_X86
    rows_fn mv, dq;
    int bw, bb, integer;
    if (!lookup(type, &mv, &dq, &integer) || !block_geometry(type, &bw, &bb) || cols <= 0 || cols % bw || rows < 0) {
        PyErr_Format(PyExc_ValueError, "_kernels.dequantize: unsupported type %d or shape [%ld, %ld]", type, rows, cols);
        return NULL;
    }
    Py_buffer r, o;
    if (!get_buffer(ro, &r, 0, "raw")) return NULL;
    if (!get_buffer(oo, &o, 1, "out")) { PyBuffer_Release(&r); return NULL; }
    long row_bytes = cols / bw * bb;
    if (r.len != rows * row_bytes || o.len != rows * cols * 4) {
        PyErr_SetString(PyExc_ValueError, "_kernels.dequantize: buffer sizes do not match the shapes");
    } else {
        args_t a = {(const uint8_t *)r.buf, rows, row_bytes, cols / 32, 0, NULL, NULL, NULL, NULL, (float *)o.buf};
        Py_BEGIN_ALLOW_THREADS
        run_rows(dq, &a, rows, chunk_rows(row_bytes, rows), 0);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&r); PyBuffer_Release(&o);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
#else
    PyErr_SetString(PyExc_RuntimeError, "_kernels: built without AVX2 kernels");
    return NULL;
#endif
}

static PyObject *py_rms_norm(PyObject *self, PyObject *args) {
    /* rms_norm(x [N, D] f32, w [D] f32, eps, out [N, D] f32) */
    PyObject *xo, *wo, *oo;
    double eps;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOdO", &xo, &wo, &eps, &oo)) return NULL;
#if HAVE_X86
    Py_buffer x, w, o;
    if (!get_buffer(xo, &x, 0, "x")) return NULL;
    if (!get_buffer(wo, &w, 0, "w")) { PyBuffer_Release(&x); return NULL; }
    if (!get_buffer(oo, &o, 1, "out")) { PyBuffer_Release(&x); PyBuffer_Release(&w); return NULL; }
    long D = (long)(w.len / 4);
    if (D < 1 || x.len % (4 * D) || o.len != x.len) {
        PyErr_SetString(PyExc_ValueError, "_kernels.rms_norm: buffer sizes do not match");
    } else {
        op_t a = {(const float *)x.buf, (const float *)w.buf, NULL, NULL, NULL, (float *)o.buf, D, 0, 0, 0, 0, 0, (float)eps, 0};
        long N = (long)(x.len / (4 * D));
        Py_BEGIN_ALLOW_THREADS
        rms_rows(&a, 0, N);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&x); PyBuffer_Release(&w); PyBuffer_Release(&o);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
#else
    (void)eps; PyErr_SetString(PyExc_RuntimeError, "_kernels: built without AVX2 kernels"); return NULL;
#endif
}

static PyObject *py_swiglu(PyObject *self, PyObject *args) {
    /* swiglu(gate_up [N, 2F] f32, out [N, F] f32): out = silu(gate) * up, gate and up side by side */
    PyObject *xo, *oo;
    (void)self;
    if (!PyArg_ParseTuple(args, "OO", &xo, &oo)) return NULL;
#if HAVE_X86
    Py_buffer x, o;
    if (!get_buffer(xo, &x, 0, "gate_up")) return NULL;
    if (!get_buffer(oo, &o, 1, "out")) { PyBuffer_Release(&x); return NULL; }
    if (o.ndim != 2 || o.itemsize != 4 || x.len != 2 * o.len || o.shape[1] < 1) {
        PyErr_SetString(PyExc_ValueError, "_kernels.swiglu: gate_up must be [N, 2F] for out [N, F], float32");
    } else {
        op_t a = {(const float *)x.buf, NULL, NULL, NULL, NULL, (float *)o.buf, (long)o.shape[1], 0, 0, 0, 0, 0, 0, 0};
        Py_BEGIN_ALLOW_THREADS
        swiglu_rows(&a, 0, (long)o.shape[0]);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&x); PyBuffer_Release(&o);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
#else
    PyErr_SetString(PyExc_RuntimeError, "_kernels: built without AVX2 kernels"); return NULL;
#endif
}

static PyObject *py_attend(PyObject *self, PyObject *args) {
    /* attend(q [H, Hd], k [K, S, Hd], v [K, S, Hd], scale, out [H, Hd]), float32; k and v may be views of
       a longer cache (rows Hd floats apart, heads any distance apart) */
    PyObject *qo, *ko, *vo, *oo;
    double scale;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOdO", &qo, &ko, &vo, &scale, &oo)) return NULL;
#if HAVE_X86
    Py_buffer q, k, v, o;
    if (!get_buffer(qo, &q, 0, "q")) return NULL;
    if (PyObject_GetBuffer(ko, &k, PyBUF_STRIDES) < 0) { PyBuffer_Release(&q); return NULL; }
    if (PyObject_GetBuffer(vo, &v, PyBUF_STRIDES) < 0) { PyBuffer_Release(&q); PyBuffer_Release(&k); return NULL; }
    if (!get_buffer(oo, &o, 1, "out")) { PyBuffer_Release(&q); PyBuffer_Release(&k); PyBuffer_Release(&v); return NULL; }
    int ok = q.ndim == 2 && k.ndim == 3 && v.ndim == 3 && o.ndim == 2 && q.itemsize == 4 && k.itemsize == 4
             && v.itemsize == 4 && o.itemsize == 4 && k.shape[0] >= 1 && k.shape[1] >= 1
             && q.shape[1] == k.shape[2] && k.shape[2] == v.shape[2] && k.shape[0] == v.shape[0] && k.shape[1] == v.shape[1]
             && q.shape[0] % k.shape[0] == 0 && o.shape[0] == q.shape[0] && o.shape[1] == q.shape[1]
             && k.strides[2] == 4 && v.strides[2] == 4 && k.strides[1] == 4 * k.shape[2] && v.strides[1] == 4 * v.shape[2]
             && k.strides[0] % 4 == 0 && v.strides[0] % 4 == 0 && k.strides[0] >= 0 && v.strides[0] >= 0;
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "_kernels.attend: shapes do not match q [H, Hd], k, v [K, S, Hd] (rows contiguous), out [H, Hd]");
    } else {
        long H = (long)q.shape[0], Hd = (long)q.shape[1], S = (long)k.shape[1];
        op_t a = {NULL, NULL, (const float *)q.buf, (const float *)k.buf, (const float *)v.buf, (float *)o.buf,
                  0, Hd, S, H / (long)k.shape[0], (long)(k.strides[0] / 4), (long)(v.strides[0] / 4), 0, (float)scale};
        Py_BEGIN_ALLOW_THREADS
        run_rows(attend_heads, &a, H, S >= 512 ? 1 : H, 1);  /* a long cache: heads shared out among threads */
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&q); PyBuffer_Release(&k); PyBuffer_Release(&v); PyBuffer_Release(&o);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
#else
    (void)scale; PyErr_SetString(PyExc_RuntimeError, "_kernels: built without AVX2 kernels"); return NULL;
#endif
}

static PyObject *py_supported(PyObject *self, PyObject *args) {
    /* the ggml type ids this build and this CPU can run (empty: use the numba kernels) */
    (void)self; (void)args;
    PyObject *out = PyList_New(0);
    if (!out || !cpu_ok()) return out;
#if HAVE_X86
    int ids[] = {F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16};
    for (unsigned i = 0; i < sizeof ids / sizeof ids[0]; i++) {
        PyObject *v = PyLong_FromLong(ids[i]);
        if (!v || PyList_Append(out, v) < 0) { Py_XDECREF(v); Py_DECREF(out); return NULL; }
        Py_DECREF(v);
    }
#endif
    return out;
}

static PyObject *py_set_threads(PyObject *self, PyObject *args) {
    /* threads the kernels use from the next call on (n > 0; before the first call only, or after a fork:
       running workers are not stopped), and the count in effect */
    int n;
    (void)self;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
#if HAVE_X86
    pthread_mutex_lock(&pool.submit);
    if (n > 0 && !(pool.started && pool.pid == getpid())) pool.n_threads = n > MAX_THREADS ? MAX_THREADS : n;
    int have = pool.n_threads ? pool.n_threads : default_threads();
    pthread_mutex_unlock(&pool.submit);
    return PyLong_FromLong(have);
#else
    (void)n;
    return PyLong_FromLong(1);
#endif
}

static PyMethodDef methods[] = {
    {"matvec", py_matvec, METH_VARARGS, "matvec(type, raw, rows, cols, x, out): out[N, rows] = x[N, cols] @ W.T"},
    {"dequantize", py_dequantize, METH_VARARGS, "dequantize(type, raw, rows, cols, out): out[rows, cols] = W"},
    {"rms_norm", py_rms_norm, METH_VARARGS, "rms_norm(x, w, eps, out): out = x / sqrt(mean(x^2) + eps) * w, per row"},
    {"swiglu", py_swiglu, METH_VARARGS, "swiglu(gate_up, out): out = silu(gate) * up, gate and up the two halves"},
    {"attend", py_attend, METH_VARARGS, "attend(q, k, v, scale, out): one query per head against the S positions of k and v"},
    {"supported", py_supported, METH_NOARGS, "the ggml type ids these kernels run on this CPU"},
    {"set_threads", py_set_threads, METH_VARARGS, "set_threads(n): threads of the kernels (n > 0, before their first call), returns the count"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "AVX2 kernels for ggml blocks (see kernels.py)", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
