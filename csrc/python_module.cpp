// An empty Python module: importing reggan_ext._C loads this library, whose static initializers
// register the ops with the dispatcher. Built against the stable ABI (Py_LIMITED_API).
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
