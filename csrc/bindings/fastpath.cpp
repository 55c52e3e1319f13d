// Host fast path of the public ops (dflash_kernels/_fastpath.py; docs/DESIGN.md,
// "Host fast path"). Python validates a call's arguments once per layout; this file
// remembers the layouts that passed and recognises them again in well under a
// microsecond, and allocates outputs without Python's per-call cost.
//
// A layout is the exact signature of the arguments: per tensor its dtype, device,
// sizes, strides and 16-byte alignment; per list its length and elements; the
// values of Python scalars and strings. Python's checks are a function of that
// signature and of which tensors share memory, so a remembered signature passes
// again when no tensor the op writes shares bytes with another argument (a stricter
// test than the Python one: extents that merely intersect send the call back to
// Python, which decides). Anything this file does not model (tensor subclasses,
// fake tensors, non-strided layouts, other Python objects, ints past 64 bits) is
// "not cacheable": the call takes the Python path.
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <unordered_set>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/python_variable.h>

namespace {

using Signature = std::vector<int64_t>;

struct SignatureHash {
  size_t operator()(const Signature& s) const noexcept {
    uint64_t h = 1469598103934665603ull;
    for (int64_t v : s) {
      h ^= static_cast<uint64_t>(v) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    }
    return static_cast<size_t>(h);
  }
};

constexpr int kMaxOps = 32;
// Past this many layouts per op the set starts over: an engine uses a few shape
// buckets; a caller with ever-new shapes pays the Python checks, never memory.
constexpr size_t kMaxLayouts = 4096;
std::unordered_set<Signature, SignatureHash> g_accepted[kMaxOps];

struct Extent {
  uintptr_t lo, hi;
  bool written;
};

enum Tag : int64_t { kNone = 1, kTensor, kSeq, kFalse, kTrue, kInt, kFloat, kStr };

bool is_plain_tuple(PyObject* obj) {
  // A tuple subclass that iterates like a tuple (a NamedTuple such as VerifyOutput).
  return PyTuple_CheckExact(obj) ||
         (PyTuple_Check(obj) && Py_TYPE(obj)->tp_iter == PyTuple_Type.tp_iter);
}

// Appends the signature of a tensor and its extent; false when not cacheable.
bool add_tensor(PyObject* obj, bool written, Signature& sig, std::vector<Extent>& extents,
                int64_t& dense) {
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || t.is_nested() || t.layout() != at::kStrided || !t.has_storage() ||
      t.is_meta() || t.is_neg() || t.is_conj()) {
    return false;
  }
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  const auto ptr = reinterpret_cast<uintptr_t>(t.data_ptr());
  const int64_t esize = static_cast<int64_t>(t.element_size());
  sig.push_back(kTensor);
  sig.push_back(static_cast<int64_t>(t.scalar_type()));
  const c10::Device dev = t.device();
  sig.push_back((static_cast<int64_t>(dev.type()) << 16) | static_cast<uint16_t>(dev.index()));
  sig.push_back(static_cast<int64_t>(sizes.size()));
  int64_t numel = 1;
  int64_t span = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    sig.push_back(sizes[i]);
    sig.push_back(strides[i]);
    numel *= sizes[i];
    if (strides[i] < 0) return false;
    span += (sizes[i] - 1) * strides[i];
  }
  sig.push_back(static_cast<int64_t>(ptr & 15));
  if (!t.is_contiguous()) dense = 0;
  if (numel > 0) extents.push_back({ptr, ptr + static_cast<uintptr_t>((span + 1) * esize), written});
  return true;
}

bool add_item(PyObject* obj, bool written, bool nested, Signature& sig,
              std::vector<Extent>& extents, int64_t& dense) {
  if (obj == Py_None) {
    sig.push_back(kNone);
    return true;
  }
  if (THPVariable_CheckExact(obj)) return add_tensor(obj, written, sig, extents, dense);
  if (obj == Py_True || obj == Py_False) {
    sig.push_back(obj == Py_True ? kTrue : kFalse);
    return true;
  }
  if (PyLong_CheckExact(obj)) {
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
      PyErr_Clear();
      return false;
    }
    sig.push_back(kInt);
    sig.push_back(static_cast<int64_t>(v));
    return true;
  }
  if (PyFloat_CheckExact(obj)) {
    const double d = PyFloat_AS_DOUBLE(obj);
    int64_t bits;
    std::memcpy(&bits, &d, sizeof(bits));
    sig.push_back(kFloat);
    sig.push_back(bits);
    return true;
  }
  if (PyUnicode_CheckExact(obj)) {
    Py_ssize_t n = 0;
    const char* s = PyUnicode_AsUTF8AndSize(obj, &n);
    if (s == nullptr) {
      PyErr_Clear();
      return false;
    }
    sig.push_back(kStr);
    sig.push_back(static_cast<int64_t>(n));
    for (Py_ssize_t i = 0; i < n; i += 8) {
      int64_t word = 0;
      std::memcpy(&word, s + i, static_cast<size_t>(std::min<Py_ssize_t>(8, n - i)));
      sig.push_back(word);
    }
    return true;
  }
  if (!nested && (PyList_CheckExact(obj) || is_plain_tuple(obj))) {
    PyObject* seq = obj;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject** items = PySequence_Fast_ITEMS(seq);
    sig.push_back(kSeq);
    sig.push_back(PyList_CheckExact(obj) ? -n - 1 : n);  // a list is not a tuple
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!add_item(items[i], written, true, sig, extents, dense)) return false;
    }
    return true;
  }
  return false;
}

// The signature of (op, items); false when some item is not cacheable. ``dense``:
// whether every tensor is contiguous.
bool signature_of(PyObject* const* args, Py_ssize_t nargs, long& op, Signature& sig,
                  std::vector<Extent>& extents, int64_t& dense) {
  if (nargs != 3 || !PyLong_CheckExact(args[0]) || !PyLong_CheckExact(args[1]) ||
      !PyTuple_CheckExact(args[2])) {
    PyErr_SetString(PyExc_TypeError, "expected (op: int, written: int, items: tuple)");
    return false;
  }
  op = PyLong_AsLong(args[0]);
  const unsigned long long written = PyLong_AsUnsignedLongLongMask(args[1]);
  if (op < 0 || op >= kMaxOps) {
    PyErr_SetString(PyExc_ValueError, "op index out of range");
    return false;
  }
  PyObject* items = args[2];
  const Py_ssize_t n = PyTuple_GET_SIZE(items);
  if (n > 64) {
    PyErr_SetString(PyExc_ValueError, "at most 64 items");
    return false;
  }
  sig.reserve(16 * static_cast<size_t>(n));
  sig.push_back(static_cast<int64_t>(n));
  dense = 1;
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!add_item(PyTuple_GET_ITEM(items, i), (written >> i) & 1, false, sig, extents, dense)) {
        return false;
      }
    }
  } catch (...) {  // a tensor whose sizes or address ATen refuses to give: not modelled
    return false;
  }
  return true;
}

// No byte of a written tensor is a byte of another argument.
bool written_apart(std::vector<Extent>& extents) {
  std::sort(extents.begin(), extents.end(),
            [](const Extent& a, const Extent& b) { return a.lo < b.lo; });
  for (size_t i = 0; i < extents.size(); ++i) {
    for (size_t j = i + 1; j < extents.size() && extents[j].lo < extents[i].hi; ++j) {
      if (extents[i].written || extents[j].written) return false;
    }
  }
  return true;
}

// fast_check(op, written, items) -> None (validate in Python) | True (all dense) |
// False (passed, but some tensor is strided: make the small inputs dense).
PyObject* fast_check(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  long op = 0;
  int64_t dense = 1;
  Signature sig;
  std::vector<Extent> extents;
  if (!signature_of(args, nargs, op, sig, extents, dense)) {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NONE;
  }
  if (g_accepted[op].count(sig) == 0 || !written_apart(extents)) Py_RETURN_NONE;
  return PyBool_FromLong(dense);
}

// fast_accept(op, written, items): remember the layout of a call Python validated.
PyObject* fast_accept(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  long op = 0;
  int64_t dense = 1;
  Signature sig;
  std::vector<Extent> extents;
  if (signature_of(args, nargs, op, sig, extents, dense)) {
    auto& set = g_accepted[op];
    if (set.size() >= kMaxLayouts) set.clear();
    set.insert(std::move(sig));
  } else if (PyErr_Occurred()) {
    return nullptr;
  }
  Py_RETURN_NONE;
}

// launch_key(items) -> bytes | None: the exact signature of a kernel launch's
// arguments (triton_backend/_launch.py), None when some item is not modelled.
PyObject* launch_key(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 1 || !PyTuple_CheckExact(args[0])) {
    PyErr_SetString(PyExc_TypeError, "expected (items: tuple)");
    return nullptr;
  }
  PyObject* items = args[0];
  const Py_ssize_t n = PyTuple_GET_SIZE(items);
  Signature sig;
  sig.reserve(12 * static_cast<size_t>(n) + 1);
  sig.push_back(static_cast<int64_t>(n));
  std::vector<Extent> extents;
  int64_t dense = 1;
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!add_item(PyTuple_GET_ITEM(items, i), false, false, sig, extents, dense)) {
        if (PyErr_Occurred()) return nullptr;
        Py_RETURN_NONE;
      }
    }
  } catch (...) {
    Py_RETURN_NONE;
  }
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(sig.data()),
                                   static_cast<Py_ssize_t>(sig.size() * sizeof(int64_t)));
}

// fast_forget(): drop every remembered layout (tests).
PyObject* fast_forget(PyObject*, PyObject* const*, Py_ssize_t) {
  for (auto& set : g_accepted) set.clear();
  Py_RETURN_NONE;
}

// empty(like, kind, shape, ...) -> tuple of new contiguous tensors on like's device;
// kind 0: like's dtype, 1: int32, 2: float32. One call instead of one torch.empty each.
PyObject* fast_empty(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs < 2 || !THPVariable_Check(args[0]) || !PyLong_CheckExact(args[1])) {
    PyErr_SetString(PyExc_TypeError, "expected (like: Tensor, kind: int, *shapes)");
    return nullptr;
  }
  const at::Tensor& like = THPVariable_Unpack(args[0]);
  const long kind = PyLong_AsLong(args[1]);
  const at::ScalarType dtype = kind == 1 ? at::kInt : kind == 2 ? at::kFloat : like.scalar_type();
  const at::TensorOptions options = like.options().dtype(dtype);
  PyObject* out = PyTuple_New(nargs - 2);
  if (out == nullptr) return nullptr;
  try {
    for (Py_ssize_t i = 2; i < nargs; ++i) {
      PyObject* shape = args[i];
      if (!PyTuple_CheckExact(shape) || PyTuple_GET_SIZE(shape) > 8) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_TypeError, "a shape is a tuple of at most 8 ints");
        return nullptr;
      }
      int64_t dims[8];
      const Py_ssize_t nd = PyTuple_GET_SIZE(shape);
      for (Py_ssize_t d = 0; d < nd; ++d) {
        dims[d] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, d));
        if (dims[d] < 0) {
          Py_DECREF(out);
          if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "negative size");
          return nullptr;
        }
      }
      PyTuple_SET_ITEM(out, i - 2, THPVariable_Wrap(at::empty(at::IntArrayRef(dims, nd), options)));
    }
  } catch (const std::exception& e) {
    Py_DECREF(out);
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  return out;
}

}  // namespace

PyMethodDef dflash_fastpath_methods[] = {
    {"fast_check", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_check)),
     METH_FASTCALL, "fast_check(op, written, items): None | True | False (see fastpath.cpp)"},
    {"fast_accept", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_accept)),
     METH_FASTCALL, "fast_accept(op, written, items): remember a validated layout"},
    {"fast_forget", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_forget)),
     METH_FASTCALL, "fast_forget(): drop every remembered layout"},
    {"launch_key", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(launch_key)),
     METH_FASTCALL, "launch_key(items): bytes naming the arguments' exact kinds, or None"},
    {"empty", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_empty)),
     METH_FASTCALL, "empty(like, kind, *shapes): new tensors on like's device"},
    {nullptr, nullptr, 0, nullptr}};
