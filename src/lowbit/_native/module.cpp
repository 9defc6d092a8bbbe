// CPython extension lowbit._native._kernels: the kernels of kernels.h over buffer-protocol arrays.
//
// Python callers (lowbit.runtime) validate arguments and raise lowbit's own
// errors; the checks here only guarantee that no argument can make a kernel
// read or write out of bounds (they raise ValueError / TypeError).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstring>
#include <initializer_list>

#include "kernels.h"

namespace {

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

// kind: 'u' unsigned, 'i' signed, 'f' float; C-contiguous, of `ndim` dimensions.
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
    return true;
}

bool check_kernel(int kernel, int threads) {
    if (!lowbit::kernel_supported(kernel)) {
        PyErr_Format(PyExc_ValueError, "kernel %d is not supported on this CPU", kernel);
        return false;
    }
    if (threads < 0) {
        PyErr_SetString(PyExc_ValueError, "threads must be >= 0 (0: all cores)");
        return false;
    }
    return true;
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
    int kernel, threads;
    if (!PyArg_ParseTuple(args, "OOii", &x_obj, &out_obj, &kernel, &threads)) return nullptr;
    View x, out;
    if (!get_view(x_obj, x, 'f', 4, 2, false, "x") || !get_view(out_obj, out, 'u', 8, 2, true, "out")) return nullptr;
    if (!check_kernel(kernel, threads)) return nullptr;
    const Py_ssize_t rows = x.view.shape[0], k = x.view.shape[1];
    if (out.view.shape[0] != rows || out.view.shape[1] != (k + 63) / 64) {
        PyErr_SetString(PyExc_ValueError, "out must have shape [rows, ceil(K / 64)]");
        return nullptr;
    }
    Py_BEGIN_ALLOW_THREADS
    lowbit::pack_signs_f32(static_cast<const float*>(x.view.buf), rows, k, static_cast<uint64_t*>(out.view.buf), kernel,
                           threads);
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

bool fail(const char* message) {
    PyErr_SetString(PyExc_ValueError, message);
    return false;
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
        if (o.out.view.shape[0] != m || o.out.view.shape[1] != (n + 63) / 64)
            return fail("a uint64 out must have shape [a rows, ceil(b rows / 64)]");
        if (thr_obj == Py_None || dir_obj == Py_None) return fail("a uint64 out needs threshold and direction");
        if (!channel_vector(thr_obj, o.thr, 'i', n, "threshold") || !channel_vector(dir_obj, o.dir, 'i', n, "direction"))
            return false;
        ep.threshold = static_cast<const int32_t*>(o.thr.view.buf);
        ep.direction = static_cast<const int32_t*>(o.dir.view.buf);
    } else {
        if (o.out.view.shape[0] * o.out.view.shape[1] != m * n ||
            (nchw_pixels == 0 && (o.out.view.shape[0] != m || o.out.view.shape[1] != n)))
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
    long long k, nchw_pixels;
    int kernel, threads;
    if (!PyArg_ParseTuple(args, "OOLOiiOOOLOO", &a_obj, &b_obj, &k, &out_obj, &kernel, &threads, &scale_obj, &bias_obj,
                          &corr_obj, &nchw_pixels, &thr_obj, &dir_obj))
        return nullptr;
    View a, b;
    if (!get_view(a_obj, a, 'u', 8, 2, false, "a") || !get_view(b_obj, b, 'u', 8, 2, false, "b")) return nullptr;
    if (!check_kernel(kernel, threads)) return nullptr;
    const Py_ssize_t m = a.view.shape[0], n = b.view.shape[0], words = a.view.shape[1];
    if (b.view.shape[1] != words || k < 1 || k > 64 * static_cast<long long>(words)) {
        PyErr_SetString(PyExc_ValueError, "a and b must have the same words per row, 1 <= k <= 64 * words");
        return nullptr;
    }
    Output o;
    if (!parse_output(o, m, n, nchw_pixels, out_obj, scale_obj, bias_obj, corr_obj, thr_obj, dir_obj)) return nullptr;
    Py_BEGIN_ALLOW_THREADS
    lowbit::binary_gemm(static_cast<const uint64_t*>(a.view.buf), m, static_cast<const uint64_t*>(b.view.buf), n, words, k,
                        o.ints(), o.floats(), o.bits(), o.epilogue, kernel, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyObject* py_pack_nchw(PyObject*, PyObject* args) {
    PyObject *x_obj, *out_obj;
    int threads;
    if (!PyArg_ParseTuple(args, "OOi", &x_obj, &out_obj, &threads)) return nullptr;
    View x, out;
    if (!get_view(x_obj, x, 'f', 4, 4, false, "x") || !get_view(out_obj, out, 'u', 8, 4, true, "out")) return nullptr;
    if (threads < 0) return PyErr_Format(PyExc_ValueError, "threads must be >= 0 (0: all cores)");
    const Py_ssize_t batch = x.view.shape[0], c = x.view.shape[1], h = x.view.shape[2], w = x.view.shape[3];
    if (out.view.shape[0] != batch || out.view.shape[1] != h || out.view.shape[2] != w || out.view.shape[3] != (c + 63) / 64)
        return PyErr_Format(PyExc_ValueError, "out must have shape [N, H, W, ceil(C / 64)] for x [N, C, H, W]");
    Py_BEGIN_ALLOW_THREADS
    lowbit::pack_signs_nchw(static_cast<const float*>(x.view.buf), batch, c, h * w, static_cast<uint64_t*>(out.view.buf),
                            threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

// Output size of a window op over [N, H, W, words]; false (with an exception set) on a bad geometry.
bool window_output(const View& x, int kh, int kw, int sh, int sw, int ph, int pw, int threads, Py_ssize_t& ho,
                   Py_ssize_t& wo) {
    if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || ph < 0 || pw < 0 || threads < 0) {
        PyErr_SetString(PyExc_ValueError, "kernel and stride must be >= 1, padding and threads >= 0");
        return false;
    }
    const Py_ssize_t span_h = x.view.shape[1] + 2 * static_cast<Py_ssize_t>(ph) - kh;
    const Py_ssize_t span_w = x.view.shape[2] + 2 * static_cast<Py_ssize_t>(pw) - kw;
    if (span_h < 0 || span_w < 0) {
        PyErr_SetString(PyExc_ValueError, "the kernel is larger than the padded input");
        return false;
    }
    ho = span_h / sh + 1;
    wo = span_w / sw + 1;
    return true;
}

PyObject* py_max_pool(PyObject*, PyObject* args) {
    PyObject *x_obj, *mask_obj, *out_obj;
    int kh, kw, sh, sw, ph, pw, threads;
    if (!PyArg_ParseTuple(args, "O(ii)(ii)(ii)OOi", &x_obj, &kh, &kw, &sh, &sw, &ph, &pw, &mask_obj, &out_obj, &threads))
        return nullptr;
    View x, mask, out;
    if (!get_view(x_obj, x, 'u', 8, 4, false, "x") || !get_view(mask_obj, mask, 'u', 8, 1, false, "and_mask") ||
        !get_view(out_obj, out, 'u', 8, 4, true, "out"))
        return nullptr;
    Py_ssize_t ho, wo;
    if (!window_output(x, kh, kw, sh, sw, ph, pw, threads, ho, wo)) return nullptr;
    if (ph * 2 > kh || pw * 2 > kw) return PyErr_Format(PyExc_ValueError, "padding must be at most half the kernel");
    const Py_ssize_t batch = x.view.shape[0], words = x.view.shape[3];
    if (mask.view.shape[0] != words || out.view.shape[0] != batch || out.view.shape[1] != ho || out.view.shape[2] != wo ||
        out.view.shape[3] != words)
        return PyErr_Format(PyExc_ValueError, "and_mask must have [words], out [N, Ho, Wo, words]");
    Py_BEGIN_ALLOW_THREADS
    lowbit::max_pool_packed(static_cast<const uint64_t*>(x.view.buf), batch, x.view.shape[1], x.view.shape[2], words, kh,
                            kw, sh, sw, ph, pw, ho, wo, static_cast<const uint64_t*>(mask.view.buf),
                            static_cast<uint64_t*>(out.view.buf), threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyObject* py_conv(PyObject*, PyObject* args) {
    PyObject *x_obj, *panel_obj, *out_obj, *scale_obj, *bias_obj, *corr_obj, *thr_obj, *dir_obj;
    int kh, kw, sh, sw, ph, pw, kernel, threads;
    long long out_channels, k;
    if (!PyArg_ParseTuple(args, "OO(ii)(ii)(ii)LLOiiOOOOO", &x_obj, &panel_obj, &kh, &kw, &sh, &sw, &ph, &pw,
                          &out_channels, &k, &out_obj, &kernel, &threads, &scale_obj, &bias_obj, &corr_obj, &thr_obj,
                          &dir_obj))
        return nullptr;
    View x, panel;
    if (!get_view(x_obj, x, 'u', 8, 4, false, "x") || !get_view(panel_obj, panel, 'u', 8, 3, false, "panel"))
        return nullptr;
    if (!check_kernel(kernel, threads)) return nullptr;
    Py_ssize_t ho, wo;
    if (!window_output(x, kh, kw, sh, sw, ph, pw, threads, ho, wo)) return nullptr;
    const Py_ssize_t batch = x.view.shape[0], h = x.view.shape[1], w = x.view.shape[2], words = x.view.shape[3];
    const long long row_words = static_cast<long long>(kh) * kw * words;
    if (out_channels < 1 || panel.view.shape[0] != (out_channels + lowbit::CONV_PANEL - 1) / lowbit::CONV_PANEL ||
        panel.view.shape[1] != row_words || panel.view.shape[2] != lowbit::CONV_PANEL)
        return PyErr_Format(PyExc_ValueError, "panel must have shape [ceil(out_channels / 8), kh * kw * words, 8]");
    if (k < 1 || k > 64 * row_words) return PyErr_Format(PyExc_ValueError, "k must be in 1 .. 64 * kh * kw * words");
    Output o;
    const Py_ssize_t m = batch * ho * wo;
    if (!parse_output(o, m, out_channels, out_kind(out_obj) == 'f' ? ho * wo : 0, out_obj, scale_obj, bias_obj, corr_obj,
                      thr_obj, dir_obj))
        return nullptr;
    Py_BEGIN_ALLOW_THREADS
    lowbit::binary_conv(static_cast<const uint64_t*>(x.view.buf), batch, h, w, words, kh, kw, sh, sw, ph, pw, ho, wo,
                        static_cast<const uint64_t*>(panel.view.buf), out_channels, k, o.ints(), o.floats(), o.bits(),
                        o.epilogue, kernel, threads);
    Py_END_ALLOW_THREADS
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

PyMODINIT_FUNC PyInit__kernels() { return PyModule_Create(&module); }
