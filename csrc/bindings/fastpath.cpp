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
//
// A remembered layout may also hold the op's call plan (_fastpath.py, "Call
// plans"): how the Python path built the backend's arguments, outputs and result
// from the items, recorded the first time. The signature fixes every value that
// construction reads (shapes, dtypes, None-ness, scalars), so a later call of the
// same layout rebuilds them here and calls the backend function directly.
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

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
// Remembered layout -> its call plan (a new reference), Py_None when the layout has
// none (not plannable), nullptr when none is recorded yet.
std::unordered_map<Signature, PyObject*, SignatureHash> g_accepted[kMaxOps];

void clear_layouts(std::unordered_map<Signature, PyObject*, SignatureHash>& map) {
  for (auto& kv : map) Py_XDECREF(kv.second);
  map.clear();
}

struct Extent {
  uintptr_t lo, hi;
  bool written;
};

enum Tag : int64_t { kNone = 1, kTensor, kSeq, kFalse, kTrue, kInt, kFloat, kStr, kDesc };

// Triton's host TensorDescriptor class (launch_key_types): a kernel argument the
// TMA paths pass; described by its fields.
PyObject* g_descriptor_type = nullptr;
const char* const kDescriptorFields[] = {"base", "shape", "strides", "block_shape", "padding",
                                         "round_f32_to_tf32"};

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
  if (!nested && g_descriptor_type != nullptr &&
      reinterpret_cast<PyObject*>(Py_TYPE(obj)) == g_descriptor_type) {
    sig.push_back(kDesc);
    for (const char* field : kDescriptorFields) {
      PyObject* v = PyObject_GetAttrString(obj, field);
      if (v == nullptr) {
        PyErr_Clear();
        return false;
      }
      const bool ok = add_item(v, written, false, sig, extents, dense);
      Py_DECREF(v);
      if (!ok) return false;
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
// ``key`` (args[3], optional): one more item that joins the signature but is not an
// argument the checks read (the call's ``backend``).
bool signature_of(PyObject* const* args, Py_ssize_t nargs, long& op, Signature& sig,
                  std::vector<Extent>& extents, int64_t& dense) {
  if (nargs < 3 || !PyLong_CheckExact(args[0]) || !PyLong_CheckExact(args[1]) ||
      !PyTuple_CheckExact(args[2])) {
    PyErr_SetString(PyExc_TypeError, "expected (op: int, written: int, items: tuple, ...)");
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
    if (nargs >= 4) {
      PyObject* key = args[3];
      if (key != Py_None && !PyUnicode_CheckExact(key)) return false;
      if (!add_item(key, false, true, sig, extents, dense)) return false;
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

// Outputs of one call: contiguous tensors of the given dtypes and sizes on one device,
// carved from one allocation (one allocator call instead of one per output; each
// starts on a 64-byte boundary, so no two share a byte).
std::vector<at::Tensor> alloc_outputs(const at::TensorOptions& options,
                                      const std::vector<at::ScalarType>& dtypes,
                                      const std::vector<std::vector<int64_t>>& shapes) {
  std::vector<int64_t> offsets(dtypes.size());
  int64_t total = 0;
  for (size_t i = 0; i < dtypes.size(); ++i) {
    int64_t numel = 1;
    for (int64_t d : shapes[i]) numel *= d;
    offsets[i] = total;
    total += (numel * static_cast<int64_t>(c10::elementSize(dtypes[i])) + 63) / 64 * 64;
  }
  std::vector<at::Tensor> out;
  out.reserve(dtypes.size());
  if (dtypes.size() == 1) {
    out.push_back(at::empty(shapes[0], options.dtype(dtypes[0])));
    return out;
  }
  const at::Tensor buf = at::empty({std::max<int64_t>(total, 1)}, options.dtype(at::kByte));
  for (size_t i = 0; i < dtypes.size(); ++i) {
    auto impl = c10::make_intrusive<c10::TensorImpl>(
        c10::Storage(buf.storage()), buf.key_set(), caffe2::TypeMeta::fromScalarType(dtypes[i]));
    impl->set_sizes_contiguous(shapes[i]);
    impl->set_storage_offset(offsets[i] / static_cast<int64_t>(c10::elementSize(dtypes[i])));
    out.emplace_back(std::move(impl));
  }
  return out;
}

at::ScalarType kind_dtype(long kind, const at::Tensor& like) {
  return kind == 1 ? at::kInt : kind == 2 ? at::kFloat : like.scalar_type();
}

// A shape tuple of at most 8 non-negative ints; false (Python error set) otherwise.
bool read_shape(PyObject* shape, std::vector<int64_t>& dims) {
  if (!PyTuple_CheckExact(shape) || PyTuple_GET_SIZE(shape) > 8) {
    PyErr_SetString(PyExc_TypeError, "a shape is a tuple of at most 8 ints");
    return false;
  }
  const Py_ssize_t nd = PyTuple_GET_SIZE(shape);
  dims.resize(static_cast<size_t>(nd));
  for (Py_ssize_t d = 0; d < nd; ++d) {
    dims[d] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, d));
    if (dims[d] < 0) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "negative size");
      return false;
    }
  }
  return true;
}

PyObject* wrap_all(std::vector<at::Tensor>& tensors) {
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(tensors.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < tensors.size(); ++i) {
    PyTuple_SET_ITEM(out, static_cast<Py_ssize_t>(i), THPVariable_Wrap(std::move(tensors[i])));
  }
  return out;
}

// ---- call plans (_fastpath.py, "Call plans") ----
// plan = (fn, backend_env, interpret_env, arg_descs, out_specs, result_desc, stream)
// desc = (0, obj) a constant | (1, i) items[i] | (2, i, j) items[i][j] | (3, descs) a new
//        list | (4, j) output j | (5, i, sizes, strides) items[i].as_strided(...) |
//        (6, cls or None, descs) a tuple (a namedtuple cls when given)
// out_specs = ((like desc: (1, i) or (2, i, j), kind, shape), ...), all on one device.
// stream: None, or (device index, handle) when the plan holds CUDA constants kept for
// that stream (_fastpath.kept): the plan runs only while it is the current stream.
enum DescKind : long { kConst = 0, kItem, kElem, kList, kOut, kView, kTuple };

PyObject* build(PyObject* desc, PyObject* items, PyObject* outs);

std::vector<int64_t> int_tuple(PyObject* tuple) {
  std::vector<int64_t> out(static_cast<size_t>(PyTuple_GET_SIZE(tuple)));
  for (size_t d = 0; d < out.size(); ++d) {
    out[d] = PyLong_AsLongLong(PyTuple_GET_ITEM(tuple, static_cast<Py_ssize_t>(d)));
  }
  return out;
}

PyObject* build_seq(PyObject* descs, PyObject* items, PyObject* outs, bool as_list) {
  const Py_ssize_t n = PyTuple_GET_SIZE(descs);
  PyObject* seq = as_list ? PyList_New(n) : PyTuple_New(n);
  if (seq == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* v = build(PyTuple_GET_ITEM(descs, i), items, outs);
    if (v == nullptr) {
      Py_DECREF(seq);
      return nullptr;
    }
    if (as_list) {
      PyList_SET_ITEM(seq, i, v);
    } else {
      PyTuple_SET_ITEM(seq, i, v);
    }
  }
  return seq;
}

PyObject* build(PyObject* desc, PyObject* items, PyObject* outs) {
  const long kind = PyLong_AsLong(PyTuple_GET_ITEM(desc, 0));
  PyObject* v = nullptr;
  switch (kind) {
    case kConst:
      v = PyTuple_GET_ITEM(desc, 1);
      break;
    case kItem:
      v = PyTuple_GET_ITEM(items, PyLong_AsSsize_t(PyTuple_GET_ITEM(desc, 1)));
      break;
    case kElem: {
      PyObject* seq = PyTuple_GET_ITEM(items, PyLong_AsSsize_t(PyTuple_GET_ITEM(desc, 1)));
      v = PySequence_Fast_ITEMS(seq)[PyLong_AsSsize_t(PyTuple_GET_ITEM(desc, 2))];
      break;
    }
    case kList:
      return build_seq(PyTuple_GET_ITEM(desc, 1), items, outs, true);
    case kOut:
      v = PyTuple_GET_ITEM(outs, PyLong_AsSsize_t(PyTuple_GET_ITEM(desc, 1)));
      break;
    case kView: {
      const at::Tensor& t =
          THPVariable_Unpack(PyTuple_GET_ITEM(items, PyLong_AsSsize_t(PyTuple_GET_ITEM(desc, 1))));
      return THPVariable_Wrap(
          t.as_strided(int_tuple(PyTuple_GET_ITEM(desc, 2)), int_tuple(PyTuple_GET_ITEM(desc, 3))));
    }
    case kTuple: {
      PyObject* tup = build_seq(PyTuple_GET_ITEM(desc, 2), items, outs, false);
      PyObject* cls = PyTuple_GET_ITEM(desc, 1);
      if (tup == nullptr || cls == Py_None) return tup;
      // A namedtuple (the recorder checks): tuple.__new__(cls, values), what its
      // generated __new__ does, without the Python frame.
      PyObject* packed = PyTuple_Pack(1, tup);
      Py_DECREF(tup);
      if (packed == nullptr) return nullptr;
      PyObject* r = PyTuple_Type.tp_new(reinterpret_cast<PyTypeObject*>(cls), packed, nullptr);
      Py_DECREF(packed);
      return r;
    }
    default:
      PyErr_SetString(PyExc_AssertionError, "bad call-plan descriptor");
      return nullptr;
  }
  Py_INCREF(v);
  return v;
}

bool on_stream(PyObject* want) {
  if (want == Py_None) return true;
  const auto index = static_cast<c10::DeviceIndex>(PyLong_AsLong(PyTuple_GET_ITEM(want, 0)));
  const auto handle = PyLong_AsVoidPtr(PyTuple_GET_ITEM(want, 1));
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(index).stream()) == handle;
}

bool env_is(const char* name, PyObject* want) {
  const char* v = std::getenv(name);
  if (want == Py_None) return v == nullptr;
  const char* w = PyUnicode_AsUTF8(want);
  return v != nullptr && w != nullptr && std::strcmp(v, w) == 0;
}

// Runs a plan on this call's items: allocates the outputs, builds the backend's
// arguments, calls it, builds the result. New reference, or nullptr with the
// backend's exception.
PyObject* replay(PyObject* plan, PyObject* items) {
  PyObject* specs = PyTuple_GET_ITEM(plan, 4);
  const Py_ssize_t n_out = PyTuple_GET_SIZE(specs);
  PyObject* outs = nullptr;
  if (n_out > 0) {
    std::vector<at::ScalarType> dtypes;
    std::vector<std::vector<int64_t>> shapes(static_cast<size_t>(n_out));
    at::TensorOptions options;
    for (Py_ssize_t j = 0; j < n_out; ++j) {
      PyObject* spec = PyTuple_GET_ITEM(specs, j);
      // The like tensor is an item or an item's element (items keep it alive).
      PyObject* obj = build(PyTuple_GET_ITEM(spec, 0), items, nullptr);
      if (obj == nullptr) return nullptr;
      Py_DECREF(obj);
      const at::Tensor& l = THPVariable_Unpack(obj);
      if (j == 0) options = l.options();
      dtypes.push_back(kind_dtype(PyLong_AsLong(PyTuple_GET_ITEM(spec, 1)), l));
      if (!read_shape(PyTuple_GET_ITEM(spec, 2), shapes[j])) return nullptr;
    }
    std::vector<at::Tensor> tensors = alloc_outputs(options, dtypes, shapes);
    outs = wrap_all(tensors);
  } else {
    outs = PyTuple_New(0);
  }
  if (outs == nullptr) return nullptr;
  PyObject* args = build_seq(PyTuple_GET_ITEM(plan, 3), items, outs, false);
  PyObject* result = nullptr;
  if (args != nullptr) {
    PyObject* r = PyObject_Vectorcall(PyTuple_GET_ITEM(plan, 0), &PyTuple_GET_ITEM(args, 0),
                                      static_cast<size_t>(PyTuple_GET_SIZE(args)), nullptr);
    Py_DECREF(args);
    if (r != nullptr) {
      Py_DECREF(r);
      result = build(PyTuple_GET_ITEM(plan, 5), items, outs);
    }
  }
  Py_DECREF(outs);
  return result;
}

// replay with ATen's errors raised as torch raises them (torch.OutOfMemoryError for an
// allocation, as torch.empty on the Python path).
PyObject* replay_translated(PyObject* plan, PyObject* items) {
  HANDLE_TH_ERRORS
  return replay(plan, items);
  END_HANDLE_TH_ERRORS
}

constexpr long kPlanned = 2;

// fast_check(op, written, items, key=None, replay=False) -> None (validate in Python) |
// False (passed, but some tensor is strided: make the small inputs dense) | True (passed,
// all dense, no call plan yet) | 2 (passed, all dense, the plan was not run) |
// (result,) (passed, and the layout's call plan ran: the op's result).
PyObject* fast_check(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  long op = 0;
  int64_t dense = 1;
  Signature sig;
  std::vector<Extent> extents;
  if (!signature_of(args, nargs, op, sig, extents, dense)) {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NONE;
  }
  const auto it = g_accepted[op].find(sig);
  if (it == g_accepted[op].end() || !written_apart(extents)) Py_RETURN_NONE;
  if (!dense) Py_RETURN_FALSE;
  PyObject* plan = it->second;
  if (plan == nullptr) Py_RETURN_TRUE;
  // A dispatch mode or the JIT tracer must see the custom op: Python's path.
  if (plan == Py_None || nargs < 5 || !PyObject_IsTrue(args[4]) ||
      c10::impl::TorchDispatchModeTLS::any_modes_set() || torch::jit::tracer::isTracing() ||
      !env_is("DFLASH_KERNELS_BACKEND", PyTuple_GET_ITEM(plan, 1)) ||
      !env_is("TRITON_INTERPRET", PyTuple_GET_ITEM(plan, 2)) ||
      !on_stream(PyTuple_GET_ITEM(plan, 6))) {
    return PyLong_FromLong(kPlanned);
  }
  Py_INCREF(plan);  // the backend may forget layouts while it runs
  PyObject* result = replay_translated(plan, args[2]);
  Py_DECREF(plan);
  if (result == nullptr) return nullptr;
  PyObject* out = PyTuple_Pack(1, result);
  Py_DECREF(result);
  return out;
}

// fast_accept(op, written, items, key=None) -> bool: remember the layout of a call Python
// validated; True when fast_check of the same call now answers True (remembered, every
// tensor dense, written tensors apart: the call may record the layout's plan).
PyObject* fast_accept(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  long op = 0;
  int64_t dense = 1;
  Signature sig;
  std::vector<Extent> extents;
  if (signature_of(args, nargs, op, sig, extents, dense)) {
    auto& map = g_accepted[op];
    if (map.size() >= kMaxLayouts) clear_layouts(map);
    const auto placed = map.emplace(std::move(sig), nullptr);
    return PyBool_FromLong(dense && placed.first->second == nullptr && written_apart(extents));
  }
  if (PyErr_Occurred()) return nullptr;
  Py_RETURN_FALSE;
}

// fast_plan(op, written, items, key, plan): give a remembered layout its call plan
// (None: the layout has none). A layout forgotten meanwhile, or one already planned,
// is left alone.
PyObject* fast_plan(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  long op = 0;
  int64_t dense = 1;
  Signature sig;
  std::vector<Extent> extents;
  if (nargs != 5) {
    PyErr_SetString(PyExc_TypeError, "expected (op, written, items, key, plan)");
    return nullptr;
  }
  PyObject* plan = args[4];
  if (plan != Py_None && (!PyTuple_CheckExact(plan) || PyTuple_GET_SIZE(plan) != 7)) {
    PyErr_SetString(PyExc_TypeError, "a call plan is a 7-tuple or None");
    return nullptr;
  }
  if (signature_of(args, nargs, op, sig, extents, dense)) {
    const auto it = g_accepted[op].find(sig);
    if (it != g_accepted[op].end() && it->second == nullptr) {
      Py_INCREF(plan);
      it->second = plan;
    }
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

// fast_forget(plans_only=False): drop every remembered layout, or only their plans.
PyObject* fast_forget(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  const bool plans_only = nargs > 0 && PyObject_IsTrue(args[0]);
  for (auto& map : g_accepted) {
    if (!plans_only) {
      clear_layouts(map);
      continue;
    }
    for (auto& kv : map) {
      Py_XDECREF(kv.second);
      kv.second = nullptr;
    }
  }
  Py_RETURN_NONE;
}

// empty(like, kind, shape, ...) -> tuple of new contiguous tensors on like's device;
// kind 0: like's dtype, 1: int32, 2: float32. One call (and one allocation) instead of
// one torch.empty each.
PyObject* fast_empty(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs < 2 || !THPVariable_Check(args[0]) || !PyLong_CheckExact(args[1])) {
    PyErr_SetString(PyExc_TypeError, "expected (like: Tensor, kind: int, *shapes)");
    return nullptr;
  }
  const at::Tensor& like = THPVariable_Unpack(args[0]);
  const at::ScalarType dtype = kind_dtype(PyLong_AsLong(args[1]), like);
  std::vector<std::vector<int64_t>> shapes(static_cast<size_t>(nargs - 2));
  for (Py_ssize_t i = 2; i < nargs; ++i) {
    if (!read_shape(args[i], shapes[i - 2])) return nullptr;
  }
  HANDLE_TH_ERRORS
  std::vector<at::Tensor> tensors =
      alloc_outputs(like.options(), std::vector<at::ScalarType>(shapes.size(), dtype), shapes);
  return wrap_all(tensors);
  END_HANDLE_TH_ERRORS
}

// launch_key_types(descriptor_type): the class launch_key describes by its fields.
PyObject* launch_key_types(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 1 || !PyType_Check(args[0])) {
    PyErr_SetString(PyExc_TypeError, "expected (descriptor_type: type)");
    return nullptr;
  }
  Py_INCREF(args[0]);
  Py_XDECREF(g_descriptor_type);
  g_descriptor_type = args[0];
  Py_RETURN_NONE;
}

}  // namespace

// One METH_FASTCALL entry of the module's method table.
#define DFLASH_FASTCALL(name, fn, doc) \
  {name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fn)), METH_FASTCALL, doc}

PyMethodDef dflash_fastpath_methods[] = {
    DFLASH_FASTCALL("fast_check", fast_check,
                    "fast_check(op, written, items, key=None, replay=False): see fastpath.cpp"),
    DFLASH_FASTCALL("fast_accept", fast_accept,
                    "fast_accept(op, written, items, key=None): remember a validated layout -> bool"),
    DFLASH_FASTCALL("fast_plan", fast_plan,
                    "fast_plan(op, written, items, key, plan): a remembered layout's call plan"),
    DFLASH_FASTCALL("fast_forget", fast_forget,
                    "fast_forget(plans_only=False): drop remembered layouts (or their plans)"),
    DFLASH_FASTCALL("launch_key", launch_key,
                    "launch_key(items): bytes naming the arguments' exact kinds, or None"),
    DFLASH_FASTCALL("launch_key_types", launch_key_types,
                    "launch_key_types(descriptor_type): describe its objects by their fields"),
    DFLASH_FASTCALL("empty", fast_empty, "empty(like, kind, *shapes): new tensors on like's device"),
    {nullptr, nullptr, 0, nullptr}};
