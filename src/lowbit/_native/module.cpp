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

PyObject* py_gemm(PyObject*, PyObject* args) {
    PyObject *a_obj, *b_obj, *out_obj, *scale_obj, *bias_obj, *corr_obj;
    long long k;
    int kernel, threads;
    if (!PyArg_ParseTuple(args, "OOLOiiOOO", &a_obj, &b_obj, &k, &out_obj, &kernel, &threads, &scale_obj, &bias_obj,
                          &corr_obj))
        return nullptr;
    View a, b, out, scale, bias, corr;
    if (!get_view(a_obj, a, 'u', 8, 2, false, "a") || !get_view(b_obj, b, 'u', 8, 2, false, "b")) return nullptr;
    if (!check_kernel(kernel, threads)) return nullptr;
    const Py_ssize_t m = a.view.shape[0], n = b.view.shape[0], words = a.view.shape[1];
    if (b.view.shape[1] != words || k < 1 || k > 64 * static_cast<long long>(words)) {
        PyErr_SetString(PyExc_ValueError, "a and b must have the same words per row, 1 <= k <= 64 * words");
        return nullptr;
    }
    const bool is_float = PyObject_GetBuffer(out_obj, &out.view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) == 0 &&
                          out.view.format && std::strcmp(out.view.format, "f") == 0;
    if (out.view.obj) PyBuffer_Release(&out.view);
    PyErr_Clear();
    if (!get_view(out_obj, out, is_float ? 'f' : 'i', 4, 2, true, "out")) return nullptr;
    if (out.view.shape[0] != m || out.view.shape[1] != n) {
        PyErr_SetString(PyExc_ValueError, "out must have shape [a rows, b rows]");
        return nullptr;
    }
    lowbit::Epilogue epilogue;
    if (scale_obj != Py_None) {
        if (!get_view(scale_obj, scale, 'f', 4, 1, false, "scale")) return nullptr;
        if (scale.view.shape[0] != n) return PyErr_Format(PyExc_ValueError, "scale must hold one value per b row");
        epilogue.scale = static_cast<const float*>(scale.view.buf);
    }
    if (bias_obj != Py_None) {
        if (!get_view(bias_obj, bias, 'f', 4, 1, false, "bias")) return nullptr;
        if (bias.view.shape[0] != n) return PyErr_Format(PyExc_ValueError, "bias must hold one value per b row");
        epilogue.bias = static_cast<const float*>(bias.view.buf);
    }
    if (corr_obj != Py_None) {
        if (!get_view(corr_obj, corr, 'i', 4, 2, false, "correction")) return nullptr;
        if (corr.view.shape[0] < 1 || corr.view.shape[1] != n)
            return PyErr_Format(PyExc_ValueError, "correction must have shape [rows >= 1, b rows]");
        epilogue.correction = static_cast<const int32_t*>(corr.view.buf);
        epilogue.correction_rows = corr.view.shape[0];
    }
    if (!is_float && (epilogue.scale || epilogue.bias))
        return PyErr_Format(PyExc_ValueError, "scale and bias need a float32 out");
    Py_BEGIN_ALLOW_THREADS
    lowbit::binary_gemm(static_cast<const uint64_t*>(a.view.buf), m, static_cast<const uint64_t*>(b.view.buf), n, words, k,
                        is_float ? nullptr : static_cast<int32_t*>(out.view.buf),
                        is_float ? static_cast<float*>(out.view.buf) : nullptr, epilogue, kernel, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyObject* py_im2col(PyObject*, PyObject* args) {
    PyObject *x_obj, *out_obj;
    int kh, kw, sh, sw, ph, pw, threads;
    if (!PyArg_ParseTuple(args, "O(ii)(ii)(ii)Oi", &x_obj, &kh, &kw, &sh, &sw, &ph, &pw, &out_obj, &threads)) return nullptr;
    View x, out;
    if (!get_view(x_obj, x, 'u', 8, 4, false, "x") || !get_view(out_obj, out, 'u', 8, 2, true, "out")) return nullptr;
    if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || ph < 0 || pw < 0 || threads < 0)
        return PyErr_Format(PyExc_ValueError, "kernel and stride must be >= 1, padding and threads >= 0");
    const Py_ssize_t batch = x.view.shape[0], h = x.view.shape[1], w = x.view.shape[2], words = x.view.shape[3];
    const Py_ssize_t span_h = h + 2 * static_cast<Py_ssize_t>(ph) - kh, span_w = w + 2 * static_cast<Py_ssize_t>(pw) - kw;
    if (span_h < 0 || span_w < 0) return PyErr_Format(PyExc_ValueError, "the kernel is larger than the padded input");
    const Py_ssize_t ho = span_h / sh + 1, wo = span_w / sw + 1;
    if (out.view.shape[0] != batch * ho * wo || out.view.shape[1] != static_cast<Py_ssize_t>(kh) * kw * words)
        return PyErr_Format(PyExc_ValueError, "out must have shape [batch * ho * wo, kh * kw * words]");
    Py_BEGIN_ALLOW_THREADS
    lowbit::im2col_packed(static_cast<const uint64_t*>(x.view.buf), batch, h, w, words, kh, kw, sh, sw, ph, pw, ho, wo,
                          static_cast<uint64_t*>(out.view.buf), threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"kernels", py_kernels, METH_NOARGS, "[(name, id)] of the kernels this CPU runs, fastest first."},
    {"openmp", py_openmp, METH_NOARGS, "Whether the module was built with OpenMP."},
    {"pack_signs", py_pack_signs, METH_VARARGS, "pack_signs(x f32[rows, K], out u64[rows, W], kernel, threads)"},
    {"gemm", py_gemm, METH_VARARGS,
     "gemm(a u64[M, W], b u64[N, W], k, out i32|f32[M, N], kernel, threads, scale|None, bias|None, correction|None)"},
    {"im2col", py_im2col, METH_VARARGS, "im2col(x u64[N, H, W, words], (kh, kw), (sh, sw), (ph, pw), out, threads)"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "XNOR + popcount kernels of lowbit.", -1, methods,
                      nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__kernels() { return PyModule_Create(&module); }
