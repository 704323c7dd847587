// The Python module mmdcnv4._C: importing it loads the library, whose static initialisers register
// the ops with torch's dispatcher (TORCH_LIBRARY blocks). It exposes no Python functions of its own.
#include <Python.h>

static struct PyModuleDef mmdcnv4_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mmdcnv4_module); }
