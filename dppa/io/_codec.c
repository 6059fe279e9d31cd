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
static int histogram15(const uint16_t *v, int64_t n, int64_t *hist) {
    uint32_t *sub = calloc((size_t)SUB_HISTOGRAMS * MAGNITUDES, sizeof *sub);
    if (!sub) return -1;
    while (n > 0) {
        int64_t block = n < ((int64_t)1 << 31) ? n : ((int64_t)1 << 31);  /* uint32 counters cannot overflow */
        int64_t i = 0;
        for (; i + SUB_HISTOGRAMS <= block; i += SUB_HISTOGRAMS)
            for (int j = 0; j < SUB_HISTOGRAMS; j++) sub[j * MAGNITUDES + (v[i + j] & 0x7FFF)]++;
        for (; i < block; i++) sub[v[i] & 0x7FFF]++;
        for (int b = 0; b < MAGNITUDES; b++) {
            int64_t total = 0;
            for (int j = 0; j < SUB_HISTOGRAMS; j++) {
                total += sub[j * MAGNITUDES + b];
                sub[j * MAGNITUDES + b] = 0;
            }
            hist[b] += total;
        }
        v += block;
        n -= block;
    }
    free(sub);
    return 0;
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
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_codec", "Compiled delta decoding and 16-bit magnitude histograms.", -1, methods};

PyMODINIT_FUNC PyInit__codec(void) {
#ifdef HAVE_SHUFFLE
    __builtin_cpu_init();
    have_ssse3 = __builtin_cpu_supports("ssse3");
    build_shuffles();
#endif
    return PyModule_Create(&module);
}
