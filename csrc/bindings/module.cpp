// The importable module dflash_kernels._C: importing it loads the library,
// which runs the registrations of registration.cpp; it also holds the host
// fast path of the public ops (fastpath.cpp).
#include <Python.h>

// The host fast path's functions (fastpath.cpp) and the bound ops without the
// dispatcher (direct.cpp).
extern PyMethodDef dflash_fastpath_methods[];
extern PyMethodDef dflash_direct_methods[];

static PyModuleDef dflash_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                      "Compiled CUDA kernels of dflash_kernels (torch.ops.dflash)",
                                      -1, dflash_fastpath_methods};

#define DFLASH_STR_(x) #x
#define DFLASH_STR(x) DFLASH_STR_(x)
#ifdef DFLASH_KERNELS_SM_TARGETS
#define DFLASH_SM_TARGETS DFLASH_STR(DFLASH_KERNELS_SM_TARGETS)
#else
#define DFLASH_SM_TARGETS ""
#endif

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&dflash_c_module);
  // The SASS targets the binary was built for ("90a_100a"), so tests know what to expect.
  if (module != nullptr &&
      (PyModule_AddStringConstant(module, "sm_targets", DFLASH_SM_TARGETS) != 0 ||
       PyModule_AddFunctions(module, dflash_direct_methods) != 0)) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
