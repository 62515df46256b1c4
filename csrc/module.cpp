// Python module ptl_fused._C: loading it registers the ops; its constants let the package
// check, at import, that it runs against the torch it was built for.
#include <Python.h>

#ifndef PTL_FUSED_TORCH_VERSION
#define PTL_FUSED_TORCH_VERSION "unknown"
#endif

static struct PyModuleDef ptl_fused_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&ptl_fused_module);
  if (m == nullptr) return nullptr;
  PyModule_AddStringConstant(m, "TORCH_VERSION", PTL_FUSED_TORCH_VERSION);
#ifdef WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  return m;
}
