/* The hot loops of reading stored deltas (dppa/io/sparse.py), compiled: counting the kept elements of a range of
 * the bit mask, and expanding the kept values of a range into a dense buffer. dppa/io/codec.py holds the same
 * functions in numpy, used when this module was not built; tests/test_codec.py checks both against plain torch.
 *
 * Bit i of the mask (bit i % 8 of byte i / 8, little bit order) set means flat element i is kept; the kept values
 * follow in flat order. Elements of any size are copied as bytes, so the dtype does not matter here.
 *
 * Why compiled: numpy needs unpackbits, nonzero and a scatter, three passes and 8 bytes of index per kept value
 * (about 1 ns per element); one pass that shuffles each mask byte's values into place costs about 0.1 ns, so a
 * sparse delta reads back as fast as a dense one. The shuffle (SSSE3 pshufb, chosen at run time) covers 2- and 4-byte
 * elements on x86-64; everything else takes a branch-free scalar loop.
 *
 * Also the histogram of 16-bit magnitudes that TIES's trim and the pruners' thresholds count
 * (dppa/sparsify/threshold.py): torch.bincount takes about 5 ns per element on this kind of CPU, the loop below under
 * 1 ns.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_SHUFFLE 1
#include <immintrin.h>
#endif

static inline int bit_at(const uint8_t *mask, int64_t i) { return (mask[i >> 3] >> (i & 7)) & 1; }

static int64_t count_bits(const uint8_t *mask, int64_t first, int64_t n) {
    int64_t i = first, end = first + n, kept = 0;
    for (; i < end && (i & 7); i++) kept += bit_at(mask, i);
    for (; i + 64 <= end; i += 64) {
        uint64_t word;
        memcpy(&word, mask + (i >> 3), 8);
        kept += __builtin_popcountll(word);
    }
    for (; i + 8 <= end; i += 8) kept += __builtin_popcount(mask[i >> 3]);
    for (; i < end; i++) kept += bit_at(mask, i);
    return kept;
}

/* Elements [i, end) of the range starting at mask bit `first`, from value `v` on; returns the next value's index,
 * or -1 when the mask keeps more than the `n_values` values. Branch free but for that check (never taken on a sound
 * file): a dropped element copies from a zero block, so the loop does not depend on the (random) mask. */
static int64_t expand_scalar(const uint8_t *mask, int64_t first, int64_t i, int64_t end, const uint8_t *values,
                             int64_t v, int64_t n_values, int64_t size, uint8_t *out) {
    static const uint8_t zero[16] = {0};
    for (; i < end; i++) {
        int kept = bit_at(mask, first + i);
        if (kept && v >= n_values) return -1;
        const uint8_t *src = kept ? values + v * size : zero;
        switch (size) {  /* fixed sizes let the compiler use one load and store */
            case 1: out[i] = *src; break;
            case 2: memcpy(out + 2 * i, src, 2); break;
            case 4: memcpy(out + 4 * i, src, 4); break;
            case 8: memcpy(out + 8 * i, src, 8); break;
            default: if (kept) memcpy(out + i * size, src, size); else memset(out + i * size, 0, size);
        }
        v += kept;
    }
    return v;
}

#ifdef HAVE_SHUFFLE
/* SHUFFLE2[m]: the pshufb control that moves the first popcount(m) 2-byte values to the set bits of mask byte m
 * and zeroes the others (0x80); SHUFFLE4[q] the same for a nibble of 4-byte values. */
static uint8_t SHUFFLE2[256][16], SHUFFLE4[16][16];
static uint8_t POPCOUNT[256];  /* a table, not the popcnt instruction, which SSSE3 does not imply */

static void build_shuffles(void) {
    for (int m = 0; m < 256; m++) POPCOUNT[m] = __builtin_popcount(m);
    for (int m = 0; m < 256; m++)
        for (int j = 0, k = 0; j < 8; j++) {
            int kept = (m >> j) & 1;
            SHUFFLE2[m][2 * j] = kept ? 2 * k : 0x80;
            SHUFFLE2[m][2 * j + 1] = kept ? 2 * k + 1 : 0x80;
            k += kept;
        }
    for (int q = 0; q < 16; q++)
        for (int j = 0, k = 0; j < 4; j++) {
            int kept = (q >> j) & 1;
            for (int b = 0; b < 4; b++) SHUFFLE4[q][4 * j + b] = kept ? 4 * k + b : 0x80;
            k += kept;
        }
}

static int have_ssse3;

/* Whole mask bytes from element i (first + i a multiple of 8) while 16 bytes of values remain to load. */
__attribute__((target("ssse3"))) static int64_t expand_shuffle(const uint8_t *mask, int64_t first, int64_t *i_io,
                                                                 int64_t end, const uint8_t *values, int64_t v,
                                                                 int64_t n_values, int64_t size, uint8_t *out) {
    int64_t i = *i_io;
    if (size == 2) {
        for (; i + 8 <= end && v + 8 <= n_values; i += 8) {
            unsigned m = mask[(first + i) >> 3];
            __m128i x = _mm_loadu_si128((const __m128i *)(values + 2 * v));
            __m128i s = _mm_loadu_si128((const __m128i *)SHUFFLE2[m]);
            _mm_storeu_si128((__m128i *)(out + 2 * i), _mm_shuffle_epi8(x, s));
            v += POPCOUNT[m];
        }
    } else {
        for (; i + 4 <= end && v + 4 <= n_values; i += 4) {
            int64_t b = first + i;
            unsigned q = (mask[b >> 3] >> (b & 7)) & 15;  /* b is a multiple of 4 here */
            __m128i x = _mm_loadu_si128((const __m128i *)(values + 4 * v));
            __m128i s = _mm_loadu_si128((const __m128i *)SHUFFLE4[q]);
            _mm_storeu_si128((__m128i *)(out + 4 * i), _mm_shuffle_epi8(x, s));
            v += POPCOUNT[q];
        }
    }
    *i_io = i;
    return v;
}
#endif

/* The number of values the range consumed, or -1 when it needs more than `n_values`. */
static int64_t expand_range(const uint8_t *mask, int64_t first, int64_t count, const uint8_t *values,
                            int64_t n_values, int64_t size, uint8_t *out) {
    int64_t i = 0, v = 0;
#ifdef HAVE_SHUFFLE
    int64_t align = size == 2 ? 8 : 4;
    if (have_ssse3 && (size == 2 || size == 4)) {
        int64_t head = (align - (first % align)) % align;  /* scalar up to the first whole byte (nibble) */
        if (head > count) head = count;
        v = expand_scalar(mask, first, 0, head, values, 0, n_values, size, out);
        if (v < 0) return -1;
        i = head;
        v = expand_shuffle(mask, first, &i, count, values, v, n_values, size, out);  /* stays within n_values */
    }
#endif
    return expand_scalar(mask, first, i, count, values, v, n_values, size, out);
}

/* hist[b] += how many of the n 16-bit elements have b as their low 15 bits (a bf16 or fp16 bit pattern with its sign
 * cleared: the key that orders like the magnitude). Eight sub-histograms take consecutive elements, so a run of equal
 * values (common in bf16 deltas) does not serialise on one counter's increments. Returns -1 when out of memory. */
#define MAGNITUDES 32768
#define SUB_HISTOGRAMS 8
static void count_keys(uint32_t *sub, const uint16_t *v, int64_t n) {
    int64_t i = 0;
    for (; i + SUB_HISTOGRAMS <= n; i += SUB_HISTOGRAMS)
        for (int j = 0; j < SUB_HISTOGRAMS; j++) sub[j * MAGNITUDES + (v[i + j] & 0x7FFF)]++;
    for (; i < n; i++) sub[v[i] & 0x7FFF]++;
}

/* hist += the sub-histograms' sums; the sub-histograms back to zero. */
static void add_counts(uint32_t *sub, int64_t *hist) {
    for (int b = 0; b < MAGNITUDES; b++) {
        int64_t total = 0;
        for (int j = 0; j < SUB_HISTOGRAMS; j++) {
            total += sub[j * MAGNITUDES + b];
            sub[j * MAGNITUDES + b] = 0;
        }
        hist[b] += total;
    }
}

#define MAX_UNFLUSHED ((int64_t)1 << 31)  /* elements counted before add_counts: uint32 counters cannot overflow */

/* The sub-histograms of the calling thread: 1 MiB, allocated on its first count and freed when it ends. add_counts
 * leaves them zeroed, so they are reused as they are; a fresh calloc for every chunk cost a page fault per 4 KiB. */
static pthread_key_t counts_key;

static uint32_t *thread_counts(void) {
    uint32_t *sub = pthread_getspecific(counts_key);
    if (!sub) {
        sub = calloc((size_t)SUB_HISTOGRAMS * MAGNITUDES, sizeof(uint32_t));
        if (sub && pthread_setspecific(counts_key, sub) != 0) {
            free(sub);
            sub = NULL;
        }
    }
    return sub;
}

static int histogram15(const uint16_t *v, int64_t n, int64_t *hist) {
    uint32_t *sub = thread_counts();
    if (!sub) return -1;
    while (n > 0) {
        int64_t block = n < MAX_UNFLUSHED ? n : MAX_UNFLUSHED;
        count_keys(sub, v, block);
        add_counts(sub, hist);
        v += block;
        n -= block;
    }
    return 0;
}

/* bf16 arithmetic as torch does it on the CPU: widen to float32 (the bf16 bits are the float's high half), compute,
 * round to nearest even. A delta stored by `dppa extract`, and the
 * one `dppa merge` takes on the fly from a model folder, is bf16(float(finetune) - float(base)): these loops give the
 * same bits as torch's `finetune.sub(base)` without the intermediate tensors. */
static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0xFFFF;  /* NaN: as torch's vectorised conversion (its scalar one gives 0x7FC0) */
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

#define DELTA_BLOCK 512

/* The bf16 deltas of elements [i, i + n) into out (n <= DELTA_BLOCK); base NULL: the finetune values are the delta. */
static inline void bf16_deltas(const uint16_t *finetune, const uint16_t *base, int64_t n, uint16_t *out) {
    if (!base) {
        memcpy(out, finetune, (size_t)n * 2);
        return;
    }
    for (int64_t j = 0; j < n; j++) out[j] = float_to_bf16(bf16_to_float(finetune[j]) - bf16_to_float(base[j]));
}

/* histogram15 of the bf16 deltas finetune - base, without storing them. */
static int delta_histogram15(const uint16_t *finetune, const uint16_t *base, int64_t n, int64_t *hist) {
    uint32_t *sub = thread_counts();
    if (!sub) return -1;
    uint16_t block[DELTA_BLOCK];
    int64_t unflushed = 0;
    for (int64_t i = 0; i < n; i += DELTA_BLOCK) {
        int64_t m = n - i < DELTA_BLOCK ? n - i : DELTA_BLOCK;
        bf16_deltas(finetune + i, base + i, m, block);
        count_keys(sub, block, m);
        if ((unflushed += m) > MAX_UNFLUSHED - DELTA_BLOCK) {
            add_counts(sub, hist);
            unflushed = 0;
        }
    }
    add_counts(sub, hist);
    return 0;
}

/* Where the nth (from 1) of the bf16 deltas whose key equals `key` is: *end = the index just past it, or -1 when
 * there are fewer; returns how many were counted (nth at most). The cutoff among ties of a TIES trim threshold. */
static int64_t delta_ties(const uint16_t *finetune, const uint16_t *base, int64_t n, int32_t key, int64_t nth,
                          int64_t *end) {
    uint16_t block[DELTA_BLOCK];
    int64_t seen = 0;
    *end = -1;
    for (int64_t i = 0; i < n; i += DELTA_BLOCK) {
        int64_t m = n - i < DELTA_BLOCK ? n - i : DELTA_BLOCK, in_block = 0;
        bf16_deltas(finetune + i, base ? base + i : NULL, m, block);
        for (int64_t j = 0; j < m; j++) in_block += (block[j] & 0x7FFF) == key;
        if (seen + in_block >= nth) {
            for (int64_t j = 0;; j++)
                if ((block[j] & 0x7FFF) == key && ++seen == nth) {
                    *end = i + j + 1;
                    return seen;
                }
        }
        seen += in_block;
    }
    return seen;
}

/* out[j] = float(delta[j]) where the delta's key (its low 15 bits) is above `key`, or equals it at j < tie_end, else
 * +0.0: TIES's trim (dppa/sparsify/threshold.py's Threshold.keep_in_) fused with taking the delta. Branch free, as
 * keep_in_: out holds float32 bits, a kept one the bf16 bits shifted up, a dropped one those and-ed with 0. */
static inline void trim_block(const uint16_t *delta, int64_t n, int32_t above, uint32_t *out) {
    for (int64_t j = 0; j < n; j++) {
        int32_t k = delta[j] & 0x7FFF;
        out[j] = ((uint32_t)delta[j] << 16) & (uint32_t)-(int32_t)(k > above);
    }
}

static void trimmed_deltas(const uint16_t *finetune, const uint16_t *base, int64_t n, int64_t key, int64_t tie_end,
                           uint32_t *out) {
    uint16_t block[DELTA_BLOCK];
    /* keys are in [0, 0x7FFF]: clamping `key` to [-1, 0x7FFF] keeps every comparison in int32 */
    int32_t strict = (int32_t)(key < -1 ? -1 : key > 0x7FFF ? 0x7FFF : key);
    for (int64_t i = 0; i < n; i += DELTA_BLOCK) {
        int64_t m = n - i < DELTA_BLOCK ? n - i : DELTA_BLOCK;
        bf16_deltas(finetune + i, base ? base + i : NULL, m, block);
        int64_t ties = tie_end - i < 0 ? 0 : tie_end - i > m ? m : tie_end - i;  /* entries of the block before tie_end */
        trim_block(block, ties, strict - 1, out + i);
        trim_block(block + ties, m - ties, strict, out + i + ties);
    }
}

static int get_buffer(PyObject *obj, Py_buffer *view, int writable, const char *what) {
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS : PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Format(PyExc_TypeError, "%s: a C-contiguous%s buffer is needed", what, writable ? " writable" : "");
        return -1;
    }
    return 0;
}

static PyObject *py_count_kept(PyObject *self, PyObject *args) {
    PyObject *mask_obj;
    long long first, count;
    Py_buffer mask;
    if (!PyArg_ParseTuple(args, "OLL:count_kept", &mask_obj, &first, &count)) return NULL;
    if (get_buffer(mask_obj, &mask, 0, "mask") < 0) return NULL;
    if (first < 0 || count < 0 || (first + count + 7) / 8 > mask.len) {
        PyBuffer_Release(&mask);
        return PyErr_Format(PyExc_ValueError, "bits [%lld, %lld) outside a mask of %zd bytes", first, first + count,
                            mask.len);
    }
    int64_t kept;
    Py_BEGIN_ALLOW_THREADS
    kept = count_bits(mask.buf, first, count);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&mask);
    return PyLong_FromLongLong(kept);
}

static PyObject *py_expand(PyObject *self, PyObject *args) {
    PyObject *mask_obj, *values_obj, *out_obj;
    long long first, size;
    Py_buffer mask, values, out;
    PyObject *result = NULL;  /* before the gotos below: a buffer refused returns NULL, its error set */
    if (!PyArg_ParseTuple(args, "OLOOL:expand", &mask_obj, &first, &values_obj, &out_obj, &size)) return NULL;
    if (size < 1) return PyErr_Format(PyExc_ValueError, "element size %lld", size);
    if (get_buffer(mask_obj, &mask, 0, "mask") < 0) return NULL;
    if (get_buffer(values_obj, &values, 0, "values") < 0) goto release_mask;
    if (get_buffer(out_obj, &out, 1, "out") < 0) goto release_values;
    int64_t count = out.len / size, n_values = values.len / size;
    if (out.len % size || values.len % size) {
        PyErr_Format(PyExc_ValueError, "buffers of %zd and %zd bytes hold no whole %lld-byte elements", out.len,
                     values.len, size);
    } else if (first < 0 || (first + count + 7) / 8 > mask.len) {
        PyErr_Format(PyExc_ValueError, "bits [%lld, %lld) outside a mask of %zd bytes", first,
                     (long long)(first + count), mask.len);
    } else {
        int64_t used;
        Py_BEGIN_ALLOW_THREADS
        used = expand_range(mask.buf, first, count, values.buf, n_values, size, out.buf);
        Py_END_ALLOW_THREADS
        if (used == n_values)
            result = Py_NewRef(Py_None);
        else
            PyErr_Format(PyExc_ValueError, "the mask keeps %s elements than the %lld values given",
                         used < 0 ? "more" : "fewer", (long long)n_values);
    }
    PyBuffer_Release(&out);
release_values:
    PyBuffer_Release(&values);
release_mask:
    PyBuffer_Release(&mask);
    return result;
}

static PyObject *py_histogram15(PyObject *self, PyObject *args) {
    PyObject *values_obj, *hist_obj;
    Py_buffer values, hist;
    if (!PyArg_ParseTuple(args, "OO:histogram15", &values_obj, &hist_obj)) return NULL;
    if (get_buffer(values_obj, &values, 0, "values") < 0) return NULL;
    if (get_buffer(hist_obj, &hist, 1, "hist") < 0) {
        PyBuffer_Release(&values);
        return NULL;
    }
    PyObject *result = NULL;
    if (values.len % 2 || hist.len < MAGNITUDES * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_Format(PyExc_ValueError, "histogram15: %zd bytes of values (2 per element) and %zd bytes of hist "
                     "(at least %d int64 counts)", values.len, hist.len, MAGNITUDES);
    } else {
        int status;
        Py_BEGIN_ALLOW_THREADS
        status = histogram15(values.buf, values.len / 2, hist.buf);
        Py_END_ALLOW_THREADS
        result = status == 0 ? Py_NewRef(Py_None) : PyErr_NoMemory();
    }
    PyBuffer_Release(&hist);
    PyBuffer_Release(&values);
    return result;
}

/* TIES's combine of K float32 deltas onto a bf16 base chunk, written as bf16: dppa/merging/ties.py's ties_merge and
 * the driver's casts around it (merge.py), fused. Every float operation is the one torch performs there, in the same
 * order, so the bits are the same: weighted = delta * w (delta itself when w is 1); elected = sign(((w0 + 0) + w1)
 * + ...); agreeing = max(weighted * elected, 0) (std::max: -0.0 and NaN pass); agrees = sign(agreeing); total =
 * (a0 + 0) + a1 + ...; weight sum = a0' * w0 + a1' * w1 + ... (the agrees); mean = total * elected / divisor; merged
 * = fma(mean, scale, base), as torch's vectorised add with alpha; the module is compiled with -ffp-contract=off so
 * that no other multiply and add is fused. Returns whether every merged entry is finite. */
#define COMBINE_BLOCK 256
#define MAX_DELTAS 64

#define TIES_BODY(FMA)                                                                                                \
    float elected[COMBINE_BLOCK], total[COMBINE_BLOCK], weight_sum[COMBINE_BLOCK], tiny = 1.17549435e-38f;            \
    int finite = 1;                                                                                                   \
    for (int64_t i = 0; i < n; i += COMBINE_BLOCK) {                                                                  \
        int64_t m = n - i < COMBINE_BLOCK ? n - i : COMBINE_BLOCK;                                                    \
        for (int64_t j = 0; j < m; j++) {                                                                             \
            float x = weights[0] == 1.0f ? deltas[0][i + j] : deltas[0][i + j] * weights[0];                          \
            elected[j] = x + 0.0f;                                                                                    \
        }                                                                                                             \
        for (int d = 1; d < k; d++)                                                                                   \
            for (int64_t j = 0; j < m; j++)                                                                           \
                elected[j] = elected[j] + (weights[d] == 1.0f ? deltas[d][i + j] : deltas[d][i + j] * weights[d]);    \
        for (int64_t j = 0; j < m; j++) elected[j] = (float)(elected[j] > 0.0f) - (float)(elected[j] < 0.0f);         \
        for (int d = 0; d < k; d++) {                                                                                 \
            float w = weights[d];                                                                                     \
            for (int64_t j = 0; j < m; j++) {                                                                         \
                float x = w == 1.0f ? deltas[d][i + j] : deltas[d][i + j] * w;                                        \
                float a = x * elected[j];                                                                             \
                a = a < 0.0f ? 0.0f : a;                                                                              \
                float agrees = (float)(a > 0.0f) - (float)(a < 0.0f);                                                 \
                if (d == 0) {                                                                                         \
                    total[j] = a + 0.0f;                                                                              \
                    weight_sum[j] = agrees * w;                                                                       \
                } else {                                                                                              \
                    total[j] = total[j] + a;                                                                          \
                    weight_sum[j] = weight_sum[j] + agrees * w;                                                       \
                }                                                                                                     \
            }                                                                                                         \
        }                                                                                                             \
        for (int64_t j = 0; j < m; j++) {                                                                             \
            float ws = weight_sum[j];                                                                                 \
            float divisor = clamp_to_tiny ? (ws < tiny ? tiny : ws) : (ws == 0.0f ? 1.0f : ws);                       \
            float merged = FMA((total[j] * elected[j]) / divisor, scale, bf16_to_float(base[i + j]));                  \
            finite &= (merged - merged) == 0.0f; /* NaN for NaN and the infinities */                                 \
            out[i + j] = float_to_bf16(merged);                                                                       \
        }                                                                                                             \
    }                                                                                                                 \
    return finite;

static int ties_bf16_portable(const uint16_t *base, const float *const *deltas, const float *weights, int k,
                              float scale, int clamp_to_tiny, int64_t n, uint16_t *out) {
    TIES_BODY(fmaf)
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_FMA_CLONE 1
static int have_avx2_fma;

__attribute__((target("avx2,fma"))) static float fma_hw(float a, float b, float c) { return __builtin_fmaf(a, b, c); }

__attribute__((target("avx2,fma"))) static int ties_bf16_avx2(const uint16_t *base, const float *const *deltas,
                                                              const float *weights, int k, float scale,
                                                              int clamp_to_tiny, int64_t n, uint16_t *out) {
    TIES_BODY(fma_hw)
}
#endif

static int ties_bf16(const uint16_t *base, const float *const *deltas, const float *weights, int k, float scale,
                     int clamp_to_tiny, int64_t n, uint16_t *out) {
#ifdef HAVE_FMA_CLONE
    if (have_avx2_fma) return ties_bf16_avx2(base, deltas, weights, k, scale, clamp_to_tiny, n, out);
#endif
    return ties_bf16_portable(base, deltas, weights, k, scale, clamp_to_tiny, n, out);
}

/* Two C-contiguous buffers of 16-bit elements, `second` NULL-able: whether they hold `n` elements each. */
static int same_16bit_length(const char *fn, Py_buffer *first, Py_buffer *second) {
    if (first->len % 2 || (second && second->len != first->len)) {
        PyErr_Format(PyExc_ValueError, "%s: %zd and %zd bytes; two buffers of equal length, 2 bytes per element", fn,
                     first->len, second ? second->len : first->len);
        return 0;
    }
    return 1;
}

static PyObject *py_delta_histogram15(PyObject *self, PyObject *args) {
    PyObject *ft_obj, *base_obj, *hist_obj;
    Py_buffer ft, base, hist;
    if (!PyArg_ParseTuple(args, "OOO:delta_histogram15", &ft_obj, &base_obj, &hist_obj)) return NULL;
    if (get_buffer(ft_obj, &ft, 0, "finetune") < 0) return NULL;
    if (get_buffer(base_obj, &base, 0, "base") < 0) {
        PyBuffer_Release(&ft);
        return NULL;
    }
    if (get_buffer(hist_obj, &hist, 1, "hist") < 0) {
        PyBuffer_Release(&base);
        PyBuffer_Release(&ft);
        return NULL;
    }
    PyObject *result = NULL;
    if (!same_16bit_length("delta_histogram15", &ft, &base)) {
    } else if (hist.len < MAGNITUDES * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_Format(PyExc_ValueError, "delta_histogram15: hist has %zd bytes, not %d int64 counts", hist.len,
                     MAGNITUDES);
    } else {
        int status;
        Py_BEGIN_ALLOW_THREADS
        status = delta_histogram15(ft.buf, base.buf, ft.len / 2, hist.buf);
        Py_END_ALLOW_THREADS
        result = status == 0 ? Py_NewRef(Py_None) : PyErr_NoMemory();
    }
    PyBuffer_Release(&hist);
    PyBuffer_Release(&base);
    PyBuffer_Release(&ft);
    return result;
}

static PyObject *py_trimmed_deltas(PyObject *self, PyObject *args) {
    PyObject *ft_obj, *base_obj, *out_obj;
    long long key, tie_end;
    Py_buffer ft, base, out;
    int has_base;
    if (!PyArg_ParseTuple(args, "OOLLO:trimmed_deltas", &ft_obj, &base_obj, &key, &tie_end, &out_obj)) return NULL;
    if (get_buffer(ft_obj, &ft, 0, "finetune") < 0) return NULL;
    has_base = base_obj != Py_None;
    if (has_base && get_buffer(base_obj, &base, 0, "base") < 0) {
        PyBuffer_Release(&ft);
        return NULL;
    }
    if (get_buffer(out_obj, &out, 1, "out") < 0) {
        if (has_base) PyBuffer_Release(&base);
        PyBuffer_Release(&ft);
        return NULL;
    }
    PyObject *result = NULL;
    if (!same_16bit_length("trimmed_deltas", &ft, has_base ? &base : NULL)) {
    } else if (out.len != ft.len * 2) {
        PyErr_Format(PyExc_ValueError, "trimmed_deltas: out has %zd bytes, not 4 per element (%zd)", out.len,
                     ft.len * 2);
    } else {
        Py_BEGIN_ALLOW_THREADS
        trimmed_deltas(ft.buf, has_base ? base.buf : NULL, ft.len / 2, key, tie_end, out.buf);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&out);
    if (has_base) PyBuffer_Release(&base);
    PyBuffer_Release(&ft);
    return result;
}

static PyObject *py_delta_ties(PyObject *self, PyObject *args) {
    PyObject *ft_obj, *base_obj;
    long long key, nth;
    Py_buffer ft, base;
    if (!PyArg_ParseTuple(args, "OOLL:delta_ties", &ft_obj, &base_obj, &key, &nth)) return NULL;
    if (key < 0 || key > 0x7FFF || nth < 1) return PyErr_Format(PyExc_ValueError, "delta_ties: key %lld outside "
                                                                 "[0, 32767] or nth %lld below 1", key, nth);
    if (get_buffer(ft_obj, &ft, 0, "finetune") < 0) return NULL;
    int has_base = base_obj != Py_None;
    if (has_base && get_buffer(base_obj, &base, 0, "base") < 0) {
        PyBuffer_Release(&ft);
        return NULL;
    }
    PyObject *result = NULL;
    if (same_16bit_length("delta_ties", &ft, has_base ? &base : NULL)) {
        int64_t end, seen;
        Py_BEGIN_ALLOW_THREADS
        seen = delta_ties(ft.buf, has_base ? base.buf : NULL, ft.len / 2, (int32_t)key, nth, &end);
        Py_END_ALLOW_THREADS
        result = Py_BuildValue("LL", (long long)end, (long long)seen);
    }
    if (has_base) PyBuffer_Release(&base);
    PyBuffer_Release(&ft);
    return result;
}

static PyObject *py_ties_bf16(PyObject *self, PyObject *args) {
    PyObject *base_obj, *deltas_obj, *weights_obj, *out_obj;
    double scale;
    int clamp_to_tiny;
    if (!PyArg_ParseTuple(args, "OOOdpO:ties_bf16", &base_obj, &deltas_obj, &weights_obj, &scale, &clamp_to_tiny,
                          &out_obj))
        return NULL;
    PyObject *deltas_seq = PySequence_Fast(deltas_obj, "ties_bf16: deltas must be a sequence of buffers");
    if (!deltas_seq) return NULL;
    Py_ssize_t k = PySequence_Fast_GET_SIZE(deltas_seq);
    if (k < 1 || k > MAX_DELTAS || PySequence_Size(weights_obj) != k) {
        Py_DECREF(deltas_seq);
        return PyErr_Format(PyExc_ValueError, "ties_bf16: %zd deltas (1 to %d) and as many weights", k, MAX_DELTAS);
    }
    Py_buffer base, out, views[MAX_DELTAS];
    const float *delta_ptrs[MAX_DELTAS];
    float weights[MAX_DELTAS];
    Py_ssize_t got = 0;
    PyObject *result = NULL;
    int have_base = 0, have_out = 0;
    for (Py_ssize_t d = 0; d < k; d++) {
        PyObject *w = PySequence_GetItem(weights_obj, d);
        weights[d] = w ? (float)PyFloat_AsDouble(w) : 0.0f;
        Py_XDECREF(w);
        if (PyErr_Occurred()) goto done;
    }
    if (get_buffer(base_obj, &base, 0, "base") < 0) goto done;
    have_base = 1;
    if (get_buffer(out_obj, &out, 1, "out") < 0) goto done;
    have_out = 1;
    for (; got < k; got++) {
        if (get_buffer(PySequence_Fast_GET_ITEM(deltas_seq, got), &views[got], 0, "delta") < 0) goto done;
        delta_ptrs[got] = views[got].buf;
    }
    int lengths_agree = base.len % 2 == 0 && out.len == base.len;
    for (Py_ssize_t d = 0; d < k; d++) lengths_agree &= views[d].len == base.len * 2;
    if (!lengths_agree) {
        PyErr_Format(PyExc_ValueError, "ties_bf16: base and out need 2 bytes per element, each delta 4 (base %zd "
                     "bytes, out %zd)", base.len, out.len);
        goto done;
    }
    int finite;
    Py_BEGIN_ALLOW_THREADS
    finite = ties_bf16(base.buf, delta_ptrs, weights, (int)k, (float)scale, clamp_to_tiny, base.len / 2, out.buf);
    Py_END_ALLOW_THREADS
    result = PyBool_FromLong(finite);
done:
    for (Py_ssize_t d = 0; d < got; d++) PyBuffer_Release(&views[d]);
    if (have_out) PyBuffer_Release(&out);
    if (have_base) PyBuffer_Release(&base);
    Py_DECREF(deltas_seq);
    return result;
}

static PyMethodDef methods[] = {
    {"count_kept", py_count_kept, METH_VARARGS,
     "count_kept(mask, first, count) -> int: how many of mask bits [first, first+count) are set."},
    {"expand", py_expand, METH_VARARGS,
     "expand(mask, first, values, out, size): write into `out` (its length / size elements) the dense range that "
     "starts at mask bit `first`: the next value where a bit is set, zero bytes elsewhere. `values` must hold exactly "
     "the kept elements (ValueError otherwise)."},
    {"histogram15", py_histogram15, METH_VARARGS,
     "histogram15(values, hist): add to the int64 counts hist[0:32768] how many of the 16-bit elements of `values` "
     "have each low-15-bit pattern (a bf16 / fp16 magnitude's key)."},
    {"delta_histogram15", py_delta_histogram15, METH_VARARGS,
     "delta_histogram15(finetune, base, hist): histogram15 of the bf16 deltas finetune - base (bf16 bits, computed "
     "as torch does: in float32, rounded to nearest even), without storing them."},
    {"delta_ties", py_delta_ties, METH_VARARGS,
     "delta_ties(finetune, base, key, nth) -> (end, seen): of the bf16 deltas finetune - base (base None: finetune "
     "itself) whose 15-bit key equals `key`, `seen` counted up to the nth, and the index just past the nth (-1 when "
     "there are fewer)."},
    {"ties_bf16", py_ties_bf16, METH_VARARGS,
     "ties_bf16(base, deltas, weights, scale, clamp_to_tiny, out) -> bool: out (bf16 bits) = base (bf16 bits) + "
     "scale * TIES(weighted float32 deltas), with the bits of dppa/merging/ties.py's ties_merge and the casts around "
     "it; clamp_to_tiny: divide by max(weight sum, float32 tiny), else by the weight sum with 0 replaced by 1. "
     "Returns whether every merged entry is finite."},
    {"trimmed_deltas", py_trimmed_deltas, METH_VARARGS,
     "trimmed_deltas(finetune, base, key, tie_end, out): out (float32) = the bf16 deltas finetune - base (base None: "
     "finetune itself) where their 15-bit key is above `key` or equals it at an index below `tie_end`, else +0.0."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_codec", "Compiled delta decoding and 16-bit magnitude histograms.", -1, methods};

PyMODINIT_FUNC PyInit__codec(void) {
    if (pthread_key_create(&counts_key, free) != 0) return PyErr_NoMemory();
#if defined(HAVE_SHUFFLE) || defined(HAVE_FMA_CLONE)
    __builtin_cpu_init();
#endif
#ifdef HAVE_SHUFFLE
    have_ssse3 = __builtin_cpu_supports("ssse3");
    build_shuffles();
#endif
#ifdef HAVE_FMA_CLONE
    have_avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return PyModule_Create(&module);
}
