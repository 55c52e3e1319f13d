// The bound functions of ops.h called straight from Python (dflash_kernels._C.<name>),
// without the dispatcher: the cuda backend's eager path (dflash_kernels/cuda/*.py).
// The torch.ops.dflash.*_cuda ops of registration.cpp stay for direct users; both
// run the same host path. The dispatcher's Python argument parsing costs about 2 us
// per call for these 13-14 arguments (python -m microbench overhead, cuda rows).
#include <Python.h>

#include <exception>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/csrc/autograd/python_variable.h>

#include "ops.h"

namespace {

using dflash::bindings::OptTensor;

struct ArgError {};

const at::Tensor& tensor(PyObject* obj, const char* name) {
  if (!THPVariable_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "%s: expected a Tensor", name);
    throw ArgError{};
  }
  return THPVariable_Unpack(obj);
}

OptTensor opt_tensor(PyObject* obj, const char* name) {
  if (obj == Py_None) return std::nullopt;
  return tensor(obj, name);
}

std::vector<at::Tensor> tensor_list(PyObject* obj, const char* name) {
  if (!PyList_Check(obj) && !PyTuple_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "%s: expected a list of Tensors", name);
    throw ArgError{};
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
  PyObject** items = PySequence_Fast_ITEMS(obj);
  std::vector<at::Tensor> out;
  out.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) out.push_back(tensor(items[i], name));
  return out;
}

template <typename Fn>
PyObject* guarded(Fn&& fn) {
  try {
    fn();
  } catch (const ArgError&) {
    return nullptr;
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

bool arity(Py_ssize_t nargs, Py_ssize_t want, const char* name) {
  if (nargs == want) return true;
  PyErr_Format(PyExc_TypeError, "%s: expected %zd arguments, got %zd", name, want, nargs);
  return false;
}

template <void (*Fn)(DFLASH_VERIFY_CHAIN_ARGS)>
PyObject* verify_chain(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
  if (!arity(nargs, 14, "verify_chain_cuda")) return nullptr;
  return guarded([&] {
    Fn(tensor(a[0], "logits"), tensor(a[1], "block_tokens"), tensor(a[2], "num_drafts"),
       opt_tensor(a[3], "temperature"), opt_tensor(a[4], "top_k"), opt_tensor(a[5], "top_p"),
       opt_tensor(a[6], "seeds"), opt_tensor(a[7], "positions"), opt_tensor(a[8], "draft_probs"),
       opt_tensor(a[9], "seq_lens"), tensor(a[10], "accept_len"), tensor(a[11], "out_tokens"),
       tensor(a[12], "bonus"), opt_tensor(a[13], "new_seq_lens"));
  });
}

template <void (*Fn)(DFLASH_WRITE_KV_ARGS)>
PyObject* write_kv(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
  if (!arity(nargs, 13, "write_kv_cuda")) return nullptr;
  if (!PyFloat_Check(a[8]) || !PyBool_Check(a[9]) || !PyLong_Check(a[10])) {
    PyErr_SetString(PyExc_TypeError, "write_kv_cuda: eps, rope_neox, rotary_dim: expected float, bool, int");
    return nullptr;
  }
  const double eps = PyFloat_AS_DOUBLE(a[8]);
  const bool neox = a[9] == Py_True;
  const int64_t rotary_dim = PyLong_AsLongLong(a[10]);
  if (PyErr_Occurred()) return nullptr;
  return guarded([&] {
    const std::vector<at::Tensor> k_caches = tensor_list(a[5], "k_caches");
    const std::vector<at::Tensor> v_caches = tensor_list(a[6], "v_caches");
    Fn(tensor(a[0], "k"), tensor(a[1], "v"), opt_tensor(a[2], "k_norm_weight"),
       tensor(a[3], "positions"), tensor(a[4], "slot_mapping"), k_caches, v_caches,
       tensor(a[7], "cos_sin_cache"), eps, neox, rotary_dim, opt_tensor(a[11], "k_scale"),
       opt_tensor(a[12], "v_scale"));
  });
}

#define DFLASH_FASTCALL(fn) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fn))

}  // namespace

PyMethodDef dflash_direct_methods[] = {
    {"verify_chain_cuda", DFLASH_FASTCALL(verify_chain<dflash::bindings::verify_chain_cuda>),
     METH_FASTCALL, "torch.ops.dflash.verify_chain_cuda without the dispatcher"},
    {"write_kv_cuda", DFLASH_FASTCALL(write_kv<dflash::bindings::write_kv_cuda>), METH_FASTCALL,
     "torch.ops.dflash.write_kv_cuda without the dispatcher"},
    {"_probe_verify_chain_cuda",
     DFLASH_FASTCALL(verify_chain<dflash::bindings::probe_verify_chain_cuda>), METH_FASTCALL,
     "measurement only: the probe of verify_chain_cuda without the dispatcher"},
    {"_probe_write_kv_cuda", DFLASH_FASTCALL(write_kv<dflash::bindings::probe_write_kv_cuda>),
     METH_FASTCALL, "measurement only: the probe of write_kv_cuda without the dispatcher"},
    {nullptr, nullptr, 0, nullptr}};
