// CPython extension lowbit._native._kernels: the kernels of kernels.h over buffer-protocol arrays.
//
// Python callers (lowbit.runtime) validate arguments and raise lowbit's own
// errors; the checks here guarantee that no argument can make a kernel read
// or write out of bounds or misaligned, overflow its size arithmetic, crash
// OpenMP or loop far past the size of its buffers (they raise ValueError /
// TypeError). Sizes are computed in 64 bits; integer arguments out of range
// (even past 64 bits) are ValueErrors.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <new>

#include "kernels.h"

namespace {

// Geometry values and k: the kernels take them as int, and dot products are int32.
constexpr long long INT_LIMIT = INT_MAX;

// A buffer view released on scope exit.
struct View {
    Py_buffer view{};
    bool held = false;
    View() = default;
    View(const View&) = delete;
    View& operator=(const View&) = delete;
    ~View() {
        if (held) PyBuffer_Release(&view);
    }
};

// kind: 'u' unsigned, 'i' signed, 'f' float; C-contiguous, of `ndim` dimensions, aligned for its element type.
bool get_view(PyObject* obj, View& v, char kind, Py_ssize_t itemsize, int ndim, bool writable, const char* name) {
    const int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &v.view, flags) != 0) {
        PyErr_Format(PyExc_ValueError, "%s must be a C-contiguous%s array", name, writable ? " writable" : "");
        return false;
    }
    v.held = true;
    const char* format = v.view.format ? v.view.format : "B";
    while (*format == '@' || *format == '=' || *format == '<') ++format;
    const char* codes = kind == 'f' ? "f" : kind == 'u' ? "BHILQ" : "bhilq";
    const bool format_ok = std::strlen(format) == 1 && std::strchr(codes, format[0]) != nullptr;
    if (!format_ok || v.view.itemsize != itemsize || v.view.ndim != ndim) {
        PyErr_Format(PyExc_TypeError, "%s must be a %d-D array of %s%d", name, ndim,
                     kind == 'f' ? "float" : kind == 'u' ? "uint" : "int", static_cast<int>(itemsize * 8));
        return false;
    }
    const size_t align = itemsize == 8 ? alignof(uint64_t) : kind == 'f' ? alignof(float) : alignof(int32_t);
    if (v.view.len > 0 && reinterpret_cast<uintptr_t>(v.view.buf) % align != 0) {
        PyErr_Format(PyExc_ValueError, "%s must be aligned to %d bytes (a copy of it is)", name, static_cast<int>(align));
        return false;
    }
    return true;
}

// PyArg "O&" converter: an int (or __index__) as long long, saturated past its range so that range checks reject it.
int to_integer(PyObject* obj, void* out) {
    int overflow = 0;
    const long long value = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (value == -1 && PyErr_Occurred()) return 0;
    *static_cast<long long*>(out) = overflow > 0 ? LLONG_MAX : overflow < 0 ? LLONG_MIN : value;
    return 1;
}

// The product of sizes >= 0 (0 if any is 0); false when it does not fit Py_ssize_t.
bool product(std::initializer_list<Py_ssize_t> factors, Py_ssize_t& result) {
    for (Py_ssize_t f : factors)
        if (f == 0) {
            result = 0;
            return true;
        }
    result = 1;
    for (Py_ssize_t f : factors) {
        if (f < 0 || f > PY_SSIZE_T_MAX / result) return false;
        result *= f;
    }
    return true;
}

// ceil(bits / 64) without overflow.
Py_ssize_t words_for(Py_ssize_t bits) { return bits / 64 + (bits % 64 != 0); }

bool fail(const char* message) {
    PyErr_SetString(PyExc_ValueError, message);
    return false;
}

bool check_threads(long long threads) {
    if (threads >= 0 && threads <= lowbit::MAX_THREADS) return true;
    if (threads == LLONG_MAX || threads == LLONG_MIN)  // saturated by to_integer
        PyErr_Format(PyExc_ValueError, "threads must be in 0 .. %d (0: all cores)", lowbit::MAX_THREADS);
    else
        PyErr_Format(PyExc_ValueError, "threads must be in 0 .. %d (0: all cores), got %lld", lowbit::MAX_THREADS,
                     threads);
    return false;
}

bool check_kernel(long long kernel, long long threads) {
    if (kernel < 0 || kernel >= lowbit::KERNEL_COUNT || !lowbit::kernel_supported(static_cast<int>(kernel))) {
        PyErr_Format(PyExc_ValueError, "kernel %lld is not supported on this CPU", kernel);
        return false;
    }
    return check_threads(threads);
}

PyObject* py_kernels(PyObject*, PyObject*) {
    PyObject* names = PyList_New(0);
    if (!names) return nullptr;
    for (int kernel : {lowbit::KERNEL_AVX512, lowbit::KERNEL_NEON, lowbit::KERNEL_AVX2, lowbit::KERNEL_SCALAR}) {
        if (!lowbit::kernel_supported(kernel)) continue;
        PyObject* entry = Py_BuildValue("(si)", lowbit::kernel_name(kernel), kernel);
        if (!entry || PyList_Append(names, entry) != 0) {
            Py_XDECREF(entry);
            Py_DECREF(names);
            return nullptr;
        }
        Py_DECREF(entry);
    }
    return names;
}

PyObject* py_openmp(PyObject*, PyObject*) {
#ifdef _OPENMP
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

PyObject* py_pack_signs(PyObject*, PyObject* args) {
    PyObject *x_obj, *out_obj;
    long long kernel, threads;
    if (!PyArg_ParseTuple(args, "OOO&O&", &x_obj, &out_obj, to_integer, &kernel, to_integer, &threads)) return nullptr;
    View x, out;
    if (!get_view(x_obj, x, 'f', 4, 2, false, "x") || !get_view(out_obj, out, 'u', 8, 2, true, "out")) return nullptr;
    if (!check_kernel(kernel, threads)) return nullptr;
    const Py_ssize_t rows = x.view.shape[0], k = x.view.shape[1];
    if (out.view.shape[0] != rows || out.view.shape[1] != words_for(k)) {
        PyErr_SetString(PyExc_ValueError, "out must have shape [rows, ceil(K / 64)]");
        return nullptr;
    }
    Py_BEGIN_ALLOW_THREADS
    lowbit::pack_signs_f32(static_cast<const float*>(x.view.buf), rows, k, static_cast<uint64_t*>(out.view.buf),
                           static_cast<int>(kernel), static_cast<int>(threads));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

// The element kind of a writable C-contiguous buffer: 'f' float32, 'i' int32, 'u' uint64, 0 otherwise.
char out_kind(PyObject* obj) {
    Py_buffer view{};
    if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) != 0) {
        PyErr_Clear();
        return 0;
    }
    const char* format = view.format ? view.format : "B";
    while (*format == '@' || *format == '=' || *format == '<') ++format;
    char kind = 0;
    if (std::strlen(format) == 1) {
        if (format[0] == 'f') kind = 'f';
        else if (std::strchr("ilq", format[0]) && view.itemsize == 4) kind = 'i';
        else if (std::strchr("LQ", format[0]) && view.itemsize == 8) kind = 'u';
    }
    PyBuffer_Release(&view);
    return kind;
}

bool channel_vector(PyObject* obj, View& v, char kind, Py_ssize_t n, const char* name) {
    if (!get_view(obj, v, kind, 4, 1, false, name)) return false;
    if (v.view.shape[0] != n) {
        PyErr_Format(PyExc_ValueError, "%s must hold one value per b row", name);
        return false;
    }
    return true;
}

// The output and epilogue buffers of a GEMM with m rows and n columns, held for the kernel call.
struct Output {
    View out, scale, bias, corr, thr, dir;
    char kind = 0;  // 'i' int32, 'f' float32, 'u' packed signs
    lowbit::Epilogue epilogue;

    int32_t* ints() const { return kind == 'i' ? static_cast<int32_t*>(out.view.buf) : nullptr; }
    float* floats() const { return kind == 'f' ? static_cast<float*>(out.view.buf) : nullptr; }
    uint64_t* bits() const { return kind == 'u' ? static_cast<uint64_t*>(out.view.buf) : nullptr; }
};

// Validate out (int32 [m, n], float32 [m, n] or as many values for NCHW, uint64 [m, ceil(n / 64)]) and the
// epilogue's vectors, as lowbit::Epilogue describes them; false with an exception set when one is wrong.
bool parse_output(Output& o, Py_ssize_t m, Py_ssize_t n, long long nchw_pixels, PyObject* out_obj, PyObject* scale_obj,
                  PyObject* bias_obj, PyObject* corr_obj, PyObject* thr_obj, PyObject* dir_obj) {
    o.kind = out_kind(out_obj);
    if (!get_view(out_obj, o.out, o.kind ? o.kind : 'i', o.kind == 'u' ? 8 : 4, 2, true, "out")) return false;
    lowbit::Epilogue& ep = o.epilogue;
    if (o.kind == 'u') {
        if (o.out.view.shape[0] != m || o.out.view.shape[1] != words_for(n))
            return fail("a uint64 out must have shape [a rows, ceil(b rows / 64)]");
        if (thr_obj == Py_None || dir_obj == Py_None) return fail("a uint64 out needs threshold and direction");
        if (!channel_vector(thr_obj, o.thr, 'i', n, "threshold") || !channel_vector(dir_obj, o.dir, 'i', n, "direction"))
            return false;
        ep.threshold = static_cast<const int32_t*>(o.thr.view.buf);
        ep.direction = static_cast<const int32_t*>(o.dir.view.buf);
    } else {
        Py_ssize_t values, expected;
        if (!product({o.out.view.shape[0], o.out.view.shape[1]}, values) || !product({m, n}, expected) ||
            values != expected || (nchw_pixels == 0 && (o.out.view.shape[0] != m || o.out.view.shape[1] != n)))
            return fail("out must have shape [a rows, b rows] (or hold as many values for NCHW)");
        if (thr_obj != Py_None || dir_obj != Py_None) return fail("threshold and direction need a uint64 out");
    }
    if (nchw_pixels < 0 || (nchw_pixels > 0 && (o.kind != 'f' || m % nchw_pixels != 0)))
        return fail("nchw_pixels must be 0 or divide a rows, with a float32 out");
    ep.nchw_pixels = nchw_pixels;
    if (scale_obj != Py_None) {
        if (!channel_vector(scale_obj, o.scale, 'f', n, "scale")) return false;
        ep.scale = static_cast<const float*>(o.scale.view.buf);
    }
    if (bias_obj != Py_None) {
        if (!channel_vector(bias_obj, o.bias, 'f', n, "bias")) return false;
        ep.bias = static_cast<const float*>(o.bias.view.buf);
    }
    if (corr_obj != Py_None) {
        if (!get_view(corr_obj, o.corr, 'i', 4, 2, false, "correction")) return false;
        if (o.corr.view.shape[0] < 1 || o.corr.view.shape[1] != n)
            return fail("correction must have shape [rows >= 1, b rows]");
        ep.correction = static_cast<const int32_t*>(o.corr.view.buf);
        ep.correction_rows = o.corr.view.shape[0];
    }
    if (o.kind != 'f' && (ep.scale || ep.bias)) return fail("scale and bias need a float32 out");
    return true;
}

PyObject* py_gemm(PyObject*, PyObject* args) {
    PyObject *a_obj, *b_obj, *out_obj, *scale_obj, *bias_obj, *corr_obj, *thr_obj, *dir_obj;
    long long k, nchw_pixels, kernel, threads;
    if (!PyArg_ParseTuple(args, "OOO&OO&O&OOOO&OO", &a_obj, &b_obj, to_integer, &k, &out_obj, to_integer, &kernel,
                          to_integer, &threads, &scale_obj, &bias_obj, &corr_obj, to_integer, &nchw_pixels, &thr_obj,
                          &dir_obj))
        return nullptr;
    View a, b;
    if (!get_view(a_obj, a, 'u', 8, 2, false, "a") || !get_view(b_obj, b, 'u', 8, 2, false, "b")) return nullptr;
    if (!check_kernel(kernel, threads)) return nullptr;
    const Py_ssize_t m = a.view.shape[0], n = b.view.shape[0], words = a.view.shape[1];
    if (b.view.shape[1] != words || k < 1 || k > INT_LIMIT || words_for(static_cast<Py_ssize_t>(k)) > words) {
        PyErr_SetString(PyExc_ValueError,
                        "a and b must have the same words per row, 1 <= k <= min(64 * words, 2**31 - 1)");
        return nullptr;
    }
    Output o;
    if (!parse_output(o, m, n, nchw_pixels, out_obj, scale_obj, bias_obj, corr_obj, thr_obj, dir_obj)) return nullptr;
    Py_BEGIN_ALLOW_THREADS
    lowbit::binary_gemm(static_cast<const uint64_t*>(a.view.buf), m, static_cast<const uint64_t*>(b.view.buf), n, words, k,
                        o.ints(), o.floats(), o.bits(), o.epilogue, static_cast<int>(kernel), static_cast<int>(threads));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyObject* py_pack_nchw(PyObject*, PyObject* args) {
    PyObject *x_obj, *out_obj;
    long long threads;
    if (!PyArg_ParseTuple(args, "OOO&", &x_obj, &out_obj, to_integer, &threads)) return nullptr;
    View x, out;
    if (!get_view(x_obj, x, 'f', 4, 4, false, "x") || !get_view(out_obj, out, 'u', 8, 4, true, "out")) return nullptr;
    if (!check_threads(threads)) return nullptr;
    const Py_ssize_t batch = x.view.shape[0], c = x.view.shape[1], h = x.view.shape[2], w = x.view.shape[3];
    Py_ssize_t pixels;
    if (!product({h, w}, pixels)) return PyErr_Format(PyExc_ValueError, "x has too many pixels (H * W overflows)");
    if (out.view.shape[0] != batch || out.view.shape[1] != h || out.view.shape[2] != w ||
        out.view.shape[3] != words_for(c))
        return PyErr_Format(PyExc_ValueError, "out must have shape [N, H, W, ceil(C / 64)] for x [N, C, H, W]");
    Py_BEGIN_ALLOW_THREADS
    lowbit::pack_signs_nchw(static_cast<const float*>(x.view.buf), batch, c, pixels,
                            static_cast<uint64_t*>(out.view.buf), static_cast<int>(threads));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

// A window op's geometry, each value within a C int, and its output size over x [N, H, W, words].
struct Window {
    long long kh, kw, sh, sw, ph, pw;
    Py_ssize_t ho = 0, wo = 0, pixels = 0, rows = 0;  // rows: N * Ho * Wo
};

// Validate the geometry against x and compute the output size in 64 bits; false (exception set) when invalid.
bool window_output(const View& x, Window& g) {
    if (g.kh < 1 || g.kw < 1 || g.sh < 1 || g.sw < 1 || g.kh > INT_LIMIT || g.kw > INT_LIMIT || g.sh > INT_LIMIT ||
        g.sw > INT_LIMIT)
        return fail("kernel and stride must be in 1 .. 2**31 - 1");
    if (g.ph < 0 || g.pw < 0 || g.ph > INT_LIMIT || g.pw > INT_LIMIT) return fail("padding must be in 0 .. 2**31 - 1");
    const Py_ssize_t batch = x.view.shape[0], h = x.view.shape[1], w = x.view.shape[2];
    if (h > PY_SSIZE_T_MAX / 4 || w > PY_SSIZE_T_MAX / 4) return fail("x is too large (H or W)");
    const Py_ssize_t span_h = h + 2 * g.ph - g.kh, span_w = w + 2 * g.pw - g.kw;
    if (span_h < 0 || span_w < 0) return fail("the kernel is larger than the padded input");
    g.ho = span_h / g.sh + 1;
    g.wo = span_w / g.sw + 1;
    if (!product({g.ho, g.wo}, g.pixels) || !product({batch, g.ho, g.wo}, g.rows))
        return fail("the output is too large (N * Ho * Wo overflows)");
    return true;
}

PyObject* py_max_pool(PyObject*, PyObject* args) {
    PyObject *x_obj, *mask_obj, *out_obj;
    Window g;
    long long threads;
    if (!PyArg_ParseTuple(args, "O(O&O&)(O&O&)(O&O&)OOO&", &x_obj, to_integer, &g.kh, to_integer, &g.kw, to_integer,
                          &g.sh, to_integer, &g.sw, to_integer, &g.ph, to_integer, &g.pw, &mask_obj, &out_obj,
                          to_integer, &threads))
        return nullptr;
    View x, mask, out;
    if (!get_view(x_obj, x, 'u', 8, 4, false, "x") || !get_view(mask_obj, mask, 'u', 8, 1, false, "and_mask") ||
        !get_view(out_obj, out, 'u', 8, 4, true, "out"))
        return nullptr;
    if (!check_threads(threads) || !window_output(x, g)) return nullptr;
    if (g.ph * 2 > g.kh || g.pw * 2 > g.kw) return PyErr_Format(PyExc_ValueError, "padding must be at most half the kernel");
    const Py_ssize_t batch = x.view.shape[0], words = x.view.shape[3];
    if (mask.view.shape[0] != words || out.view.shape[0] != batch || out.view.shape[1] != g.ho ||
        out.view.shape[2] != g.wo || out.view.shape[3] != words)
        return PyErr_Format(PyExc_ValueError, "and_mask must have [words], out [N, Ho, Wo, words]");
    Py_BEGIN_ALLOW_THREADS
    lowbit::max_pool_packed(static_cast<const uint64_t*>(x.view.buf), batch, x.view.shape[1], x.view.shape[2], words,
                            static_cast<int>(g.kh), static_cast<int>(g.kw), static_cast<int>(g.sh),
                            static_cast<int>(g.sw), static_cast<int>(g.ph), static_cast<int>(g.pw), g.ho, g.wo,
                            static_cast<const uint64_t*>(mask.view.buf), static_cast<uint64_t*>(out.view.buf),
                            static_cast<int>(threads));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyObject* py_conv(PyObject*, PyObject* args) {
    PyObject *x_obj, *panel_obj, *out_obj, *scale_obj, *bias_obj, *corr_obj, *thr_obj, *dir_obj;
    Window g;
    long long out_channels, k, kernel, threads;
    if (!PyArg_ParseTuple(args, "OO(O&O&)(O&O&)(O&O&)O&O&OO&O&OOOOO", &x_obj, &panel_obj, to_integer, &g.kh,
                          to_integer, &g.kw, to_integer, &g.sh, to_integer, &g.sw, to_integer, &g.ph, to_integer,
                          &g.pw, to_integer, &out_channels, to_integer, &k, &out_obj, to_integer, &kernel, to_integer,
                          &threads, &scale_obj, &bias_obj, &corr_obj, &thr_obj, &dir_obj))
        return nullptr;
    View x, panel;
    if (!get_view(x_obj, x, 'u', 8, 4, false, "x") || !get_view(panel_obj, panel, 'u', 8, 3, false, "panel"))
        return nullptr;
    if (!check_kernel(kernel, threads) || !window_output(x, g)) return nullptr;
    const Py_ssize_t batch = x.view.shape[0], h = x.view.shape[1], w = x.view.shape[2], words = x.view.shape[3];
    Py_ssize_t row_words;
    if (!product({static_cast<Py_ssize_t>(g.kh), static_cast<Py_ssize_t>(g.kw), words}, row_words))
        return PyErr_Format(PyExc_ValueError, "kh * kw * words overflows");
    const long long groups = out_channels / lowbit::CONV_PANEL + (out_channels % lowbit::CONV_PANEL != 0);
    if (out_channels < 1 || panel.view.shape[0] != groups || panel.view.shape[1] != row_words ||
        panel.view.shape[2] != lowbit::CONV_PANEL)
        return PyErr_Format(PyExc_ValueError, "panel must have shape [ceil(out_channels / 8), kh * kw * words, 8]");
    if (k < 1 || k > INT_LIMIT || words_for(static_cast<Py_ssize_t>(k)) > row_words)
        return PyErr_Format(PyExc_ValueError, "k must be in 1 .. min(64 * kh * kw * words, 2**31 - 1)");
    Output o;
    if (!parse_output(o, g.rows, out_channels, out_kind(out_obj) == 'f' ? g.pixels : 0, out_obj, scale_obj, bias_obj,
                      corr_obj, thr_obj, dir_obj))
        return nullptr;
    bool no_memory = false;
    Py_BEGIN_ALLOW_THREADS
    try {  // the window pointers of every thread are allocated
        lowbit::binary_conv(static_cast<const uint64_t*>(x.view.buf), batch, h, w, words, static_cast<int>(g.kh),
                            static_cast<int>(g.kw), static_cast<int>(g.sh), static_cast<int>(g.sw),
                            static_cast<int>(g.ph), static_cast<int>(g.pw), g.ho, g.wo,
                            static_cast<const uint64_t*>(panel.view.buf), out_channels, k, o.ints(), o.floats(),
                            o.bits(), o.epilogue, static_cast<int>(kernel), static_cast<int>(threads));
    } catch (const std::bad_alloc&) {
        no_memory = true;
    }
    Py_END_ALLOW_THREADS
    if (no_memory) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"kernels", py_kernels, METH_NOARGS, "[(name, id)] of the kernels this CPU runs, fastest first."},
    {"openmp", py_openmp, METH_NOARGS, "Whether the module was built with OpenMP."},
    {"pack_signs", py_pack_signs, METH_VARARGS, "pack_signs(x f32[rows, K], out u64[rows, W], kernel, threads)"},
    {"gemm", py_gemm, METH_VARARGS,
     "gemm(a u64[M, W], b u64[N, W], k, out i32|f32[M, N]|u64[M, ceil(N/64)], kernel, threads, scale|None, "
     "bias|None, correction|None, nchw_pixels, threshold|None, direction|None)"},
    {"pack_nchw", py_pack_nchw, METH_VARARGS, "pack_nchw(x f32[N, C, H, W], out u64[N, H, W, ceil(C/64)], threads)"},
    {"max_pool", py_max_pool, METH_VARARGS,
     "max_pool(x u64[N, H, W, words], (kh, kw), (sh, sw), (ph, pw), and_mask u64[words], out, threads)"},
    {"conv", py_conv, METH_VARARGS,
     "conv(x u64[N, H, W, words], panel u64[ceil(O/8), kh*kw*words, 8], (kh, kw), (sh, sw), (ph, pw), O, k, "
     "out i32[N*Ho*Wo, O]|f32 NCHW [N*O, Ho*Wo]|u64[N*Ho*Wo, ceil(O/64)], kernel, threads, scale|None, bias|None, "
     "correction|None, threshold|None, direction|None)"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "XNOR + popcount kernels of lowbit.", -1, methods,
                      nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__kernels() {
    PyObject* m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "MAX_THREADS", lowbit::MAX_THREADS) != 0) {
        Py_DECREF(m);
        return nullptr;
    }
    return m;
}
