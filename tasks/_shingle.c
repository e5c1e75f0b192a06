/* Near-dedup's shingle hashes in one pass over a batch of texts (tasks/data/shingles.py: `_native_batch`).

   Why C: normalising and hashing every character of a corpus is most of near-dedup's cost, and in Python
   and numpy it takes a dozen passes over the text (NFKC, lower-casing, whitespace collapse, the n-gram
   hash); bench.near_dedup measured that at about the load stage's own seconds. Here it is one pass.

   What it computes is exactly tasks/data/shingles.py's `normalised_codepoints` + `_hash_batch` (tests check
   it on edge texts and corpora): each character goes through a table built in Python from unicodedata
   (`_fold_table`: NFKC, then lower-case, whitespace to U+0020; a few characters expand to several), the
   whitespace runs collapse to one space and the ends are stripped, and every position of the result gets
   its n-gram's polynomial hash. A character the table cannot map on its own (one that NFKC may compose with
   its neighbours, a final sigma, anything above the table) marks the text: its length comes back as -1
   and the caller normalises that text in Python and hashes it again with `strict` = 0, where the table only
   folds whitespace and characters above it pass as they are.

   hash_texts(cps, lens, table, pool_offsets, pool, n, mult, pad, strict, out, out_lens, utf8) -> written
     cps           the texts in a row: uint32 code points, or UTF-8 bytes where utf8 (an Arrow column's data:
                   no Python strings are made); a text that is not well-formed UTF-8 comes back as -1
     lens          int64, each text's length in cps (code points or bytes)
     table         uint32 [size]: a code point, EXPAND + k (pool[pool_offsets[k]:pool_offsets[k + 1]]),
                   or COMPLEX
     out           uint64, writable: the texts' values in a row (a text marked -1 has none)
     out_lens      int64, writable: each text's count of values, or -1
     written       the count of values, or minus the room needed when `out` is too small (nothing usable) */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define COMPLEX 0xFFFFFFFFu
#define EXPAND 0x80000000u

typedef struct {
    void *p;
    Py_ssize_t cap; /* in elements */
} grow_t;

static int reserve(grow_t *g, Py_ssize_t need, size_t elem) {
    if (need <= g->cap)
        return 0;
    Py_ssize_t cap = g->cap ? g->cap : 1024;
    while (cap < need)
        cap *= 2;
    void *p = realloc(g->p, (size_t)cap * elem);
    if (!p)
        return -1;
    g->p = p;
    g->cap = cap;
    return 0;
}

/* The n-gram hashes of one folded text w[0:m] into h[0:m]; n a constant where it is inlined, so the inner
   loop unrolls (a runtime n measured three times slower). */
static inline void hash_run(const uint32_t *w, Py_ssize_t m, int n, uint64_t mult, uint64_t pad, uint64_t *h) {
    if (m >= n) {
        for (Py_ssize_t i = 0; i + n <= m; i++) {
            uint64_t v = w[i];
            for (int k = 1; k < n; k++)
                v = v * mult + w[i + k];
            h[i] = v;
        }
        /* The n - 1 positions after the last n-gram repeat the first: a MinHash is the same for a multiset,
           and each text keeps exactly one value per position. */
        for (Py_ssize_t i = m - n + 1; i < m; i++)
            h[i] = h[0];
    } else {
        uint64_t v = 0;
        for (int k = 0; k < n - m; k++)
            v = v * mult + pad;
        for (Py_ssize_t i = 0; i < m; i++)
            v = v * mult + w[i];
        for (Py_ssize_t i = 0; i < m; i++)
            h[i] = v;
    }
}

static void hash_any(const uint32_t *w, Py_ssize_t m, int n, uint64_t mult, uint64_t pad, uint64_t *h) {
    switch (n) {
    case 3: hash_run(w, m, 3, mult, pad, h); break;
    case 4: hash_run(w, m, 4, mult, pad, h); break;
    case 5: hash_run(w, m, 5, mult, pad, h); break;
    case 6: hash_run(w, m, 6, mult, pad, h); break;
    case 7: hash_run(w, m, 7, mult, pad, h); break;
    case 8: hash_run(w, m, 8, mult, pad, h); break;
    default: hash_run(w, m, n, mult, pad, h);
    }
}

/* Scratch for one folded text, kept between calls: fresh memory costs a page fault per 4 KiB on first touch,
   which in a sandboxed kernel measured more than the folding itself. The GIL is held throughout. */
static grow_t work = {0};

/* The next code point of UTF-8 text s[*i:len], or COMPLEX where the bytes are not well-formed (the text then goes
   through Python, which says what is wrong with it). */
static inline uint32_t next_utf8(const uint8_t *s, int64_t len, int64_t *i) {
    uint32_t c = s[*i];
    if (c < 0x80) {
        *i += 1;
        return c;
    }
    int k = c >= 0xF5 ? 0 : c >= 0xF0 ? 3 : c >= 0xE0 ? 2 : c >= 0xC2 ? 1 : 0;
    if (!k || *i + k >= len)
        return COMPLEX;
    c &= 0x3F >> k;
    for (int j = 1; j <= k; j++) {
        uint32_t x = s[*i + j];
        if ((x & 0xC0) != 0x80)
            return COMPLEX;
        c = (c << 6) | (x & 0x3F);
    }
    static const uint32_t least[4] = {0, 0x80, 0x800, 0x10000};
    if (c < least[k] || c > 0x10FFFF || (c >= 0xD800 && c < 0xE000))
        return COMPLEX;
    *i += k + 1;
    return c;
}

/* Fold one text (code points, or UTF-8 bytes where `utf8`) into w: the table's values, whitespace runs collapsed
   as they are written (branch-free: a space follows a space or nothing only where `sp`). Returns the folded
   length, -1 for a text the table cannot fold alone, -2 when out of memory, -3 for a table pointing past the
   pool. */
static inline Py_ssize_t fold(const void *src_, int64_t len, int utf8, const uint32_t *table, Py_ssize_t size,
                              const int64_t *off, Py_ssize_t n_exp, const uint32_t *pool, Py_ssize_t n_pool,
                              int strict) {
    uint32_t *w = work.p;
    Py_ssize_t m = 0;
    int sp = 1;
    for (int64_t i = 0; i < len;) {
        uint32_t c;
        if (utf8) {
            c = next_utf8(src_, len, &i);
            if (c == COMPLEX)
                return -1;
        } else {
            c = ((const uint32_t *)src_)[i++];
        }
        /* Hangul syllables and CJK ideographs fold to themselves (the table says so too; _fold_table checks):
           without the look-up, the table's 44 KiB of syllables stay out of the L1 cache (measured 1.3x). */
        uint32_t v = (c - 0xAC00u < 11172u || c - 0x4E00u < 0x5200u) ? c
                     : c < (uint32_t)size ? table[c] : strict ? COMPLEX : c;
        if (v < EXPAND) {
            int is_sp = v == 32;
            w[m] = v;
            m += !(is_sp & sp);
            sp = is_sp;
        } else if (v == COMPLEX) {
            return -1;
        } else {
            if ((Py_ssize_t)(v - EXPAND) >= n_exp)
                return -3;
            int64_t a = off[v - EXPAND], b = off[v - EXPAND + 1];
            if (a < 0 || a > b || b > n_pool)
                return -3;
            if (reserve(&work, m + (b - a) + (len - i) + 1, 4) < 0)
                return -2;
            w = work.p;
            for (int64_t j = a; j < b; j++) {
                int is_sp = pool[j] == 32;
                w[m] = pool[j];
                m += !(is_sp & sp);
                sp = is_sp;
            }
        }
    }
    return m && w[m - 1] == 32 ? m - 1 : m;
}

static PyObject *hash_texts(PyObject *self, PyObject *args) {
    Py_buffer cps_b, lens_b, table_b, off_b, pool_b, out_b, out_lens_b;
    int n, strict, utf8;
    unsigned long long mult, pad;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*iKKiw*w*i", &cps_b, &lens_b, &table_b, &off_b, &pool_b, &n, &mult,
                          &pad, &strict, &out_b, &out_lens_b, &utf8))
        return NULL;
    PyObject *result = NULL;
    const uint8_t *src = cps_b.buf;
    const int64_t *lens = lens_b.buf;
    const uint32_t *table = table_b.buf;
    const int64_t *off = off_b.buf;
    const uint32_t *pool = pool_b.buf;
    uint64_t *h = out_b.buf;
    int64_t *out_lens = out_lens_b.buf;
    Py_ssize_t unit = utf8 ? 1 : 4;
    Py_ssize_t n_units = cps_b.len / unit, n_texts = lens_b.len / 8, size = table_b.len / 4;
    Py_ssize_t n_exp = off_b.len / 8 - 1, n_pool = pool_b.len / 4, cap = out_b.len / 8;
    if (n < 1 || out_lens_b.len / 8 < n_texts) {
        PyErr_SetString(PyExc_ValueError, "n must be at least 1 and out_lens hold a length per text");
        goto done;
    }
    Py_ssize_t at = 0, o = 0, need = 0;
    for (Py_ssize_t t = 0; t < n_texts; t++) {
        int64_t len = lens[t];
        if (len < 0 || at + len > n_units) {
            PyErr_SetString(PyExc_ValueError, "lens do not fit cps");
            goto done;
        }
        if (reserve(&work, len + 1, 4) < 0) {
            PyErr_NoMemory();
            goto done;
        }
        Py_ssize_t m = utf8 ? fold(src + at, len, 1, table, size, off, n_exp, pool, n_pool, strict)
                            : fold(src + at * 4, len, 0, table, size, off, n_exp, pool, n_pool, strict);
        at += len;
        if (m == -2) {
            PyErr_NoMemory();
            goto done;
        }
        if (m == -3) {
            PyErr_SetString(PyExc_ValueError, "table points past the pool");
            goto done;
        }
        out_lens[t] = m;
        if (m < 0)
            continue;
        need += m;
        if (o + m <= cap) {
            hash_any(work.p, m, n, mult, pad, h + o);
            o += m;
        }
    }
    /* The values written, or minus the room they need when `out` is too small (expansions such as ㎡ → m2
       make a text longer): the caller grows it and calls again. */
    result = PyLong_FromSsize_t(need <= cap ? need : -need);
done:
    PyBuffer_Release(&cps_b);
    PyBuffer_Release(&lens_b);
    PyBuffer_Release(&table_b);
    PyBuffer_Release(&off_b);
    PyBuffer_Release(&pool_b);
    PyBuffer_Release(&out_b);
    PyBuffer_Release(&out_lens_b);
    return result;
}

static PyMethodDef methods[] = {
    {"hash_texts", hash_texts, METH_VARARGS, "Shingle hashes of a batch of texts (see the module's source)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_shingle", NULL, -1, methods};

PyMODINIT_FUNC PyInit__shingle(void) { return PyModule_Create(&module); }
