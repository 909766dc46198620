// The binding layer's plumbing, for csrc/bindings.cpp: buffers, errors, keyword-argument parsing at positional
// cost, and the extent check every pointer passes before a kernel sees it. No op lives here.
#pragma once
#include <Python.h>
#include <pybind11/pybind11.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

namespace minillm_py {
namespace {  // internal linkage: included by bindings.cpp alone

namespace py = pybind11;

// A buffer: (data pointer, bytes addressable from it). (0, 0) stands for an absent optional buffer.
struct Buf {
  uintptr_t ptr = 0;
  int64_t bytes = 0;
};


// ---- errors ----

// minillm/ops checks every public argument before it gets here, but the module is importable: a size or code
// the kernels do not handle raises ValueError instead of dividing by zero or indexing past a table.
[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument("minillm._C: " + what); }

// A literal message, so a passing check builds no string (they run on every call).
void require(bool ok, const char* what) {
  if (!ok) fail(what);
}

void check(int status, const char* what) {
  if (status == minillm::kOutOfMemory) throw std::bad_alloc();
  if (status != minillm::kOk) throw std::runtime_error(std::string(what) + ": kernel failed");
}

// ---- keyword arguments at positional cost ----
// The op functions are METH_FASTCALL | METH_KEYWORDS functions: CPython passes the values and a tuple of the
// keyword names, and names written in Python source are interned strings, so a name is matched by comparing
// pointers with the interned field names. (pybind11's own keyword handling cost ~1.1 us on a 12-argument call,
// a tenth of a small attention call.) Positional arguments fill the fields in order.

[[noreturn]] void type_error(const std::string& what) { throw py::type_error("minillm._C." + what); }

void convert(PyObject* o, Buf& out, const char* name) {
  if (!PyTuple_Check(o) || PyTuple_GET_SIZE(o) != 2 || !PyLong_Check(PyTuple_GET_ITEM(o, 0)) ||
      !PyLong_Check(PyTuple_GET_ITEM(o, 1)))
    type_error(std::string(name) + " must be a buffer (pointer, bytes), two ints");
  const unsigned long long p = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(o, 0));
  const long long n = PyLong_AsLongLong(PyTuple_GET_ITEM(o, 1));
  if (PyErr_Occurred()) {  // a negative pointer or an out-of-range int: not a buffer
    PyErr_Clear();
    fail(std::string(name) + ": not a valid buffer (pointer, bytes)");
  }
  out = Buf{static_cast<uintptr_t>(p), static_cast<int64_t>(n)};
}

void convert(PyObject* o, long long& out, const char* name) {
  if (!PyLong_Check(o)) type_error(std::string(name) + " must be an int");
  out = PyLong_AsLongLong(o);
  if (PyErr_Occurred()) {
    PyErr_Clear();
    fail(std::string(name) + " does not fit int64");
  }
}

void convert(PyObject* o, long& out, const char* name) {
  long long v;
  convert(o, v, name);
  out = static_cast<long>(v);
}

void convert(PyObject* o, int& out, const char* name) {
  long long v;
  convert(o, v, name);
  if (v < std::numeric_limits<int>::min() || v > std::numeric_limits<int>::max()) fail(std::string(name) + " does not fit int");
  out = static_cast<int>(v);
}

void convert(PyObject* o, unsigned long& out, const char* name) {  // stream handles (uintptr_t)
  if (!PyLong_Check(o)) type_error(std::string(name) + " must be an int");
  out = PyLong_AsUnsignedLong(o);
  if (PyErr_Occurred()) {
    PyErr_Clear();
    fail(std::string(name) + " is not a valid handle");
  }
}

void convert(PyObject* o, bool& out, const char* name) {
  if (o != Py_True && o != Py_False) type_error(std::string(name) + " must be a bool");
  out = o == Py_True;
}

void convert(PyObject* o, double& out, const char* name) {
  if (!PyFloat_Check(o) && !PyLong_Check(o)) type_error(std::string(name) + " must be a float");
  out = PyFloat_AsDouble(o);
  if (PyErr_Occurred()) {
    PyErr_Clear();
    fail(std::string(name) + " is not a valid float");
  }
}

template <size_t N>
void convert(PyObject* o, std::array<int64_t, N>& out, const char* name) {
  if (!PyTuple_Check(o) || PyTuple_GET_SIZE(o) != static_cast<Py_ssize_t>(N))
    type_error(std::string(name) + " must be a tuple of " + std::to_string(N) + " ints");
  for (size_t i = 0; i < N; ++i) {
    long long v;
    convert(PyTuple_GET_ITEM(o, i), v, name);
    out[i] = v;
  }
}

// One keyword of a binding: its name, how it fills the argument struct, and whether the call must pass it.
template <typename In>
struct Field {
  const char* name;
  void (*set)(In&, PyObject*, const char*);
  bool required;
  PyObject* key;  // the interned name, made on first use (under the GIL)
};

#define MINILLM_FIELD(In, member) {#member, [](In& a, PyObject* o, const char* n) { convert(o, a.member, n); }, true, nullptr}
#define MINILLM_OPTIONAL(In, member) {#member, [](In& a, PyObject* o, const char* n) { convert(o, a.member, n); }, false, nullptr}

// Fills `in` from a vectorcall's positional values and keywords (kwnames) against `fields`; a TypeError names
// an unknown, repeated or missing argument.
template <typename In, size_t N>
void parse(const char* fn, std::array<Field<In>, N>& fields, PyObject* const* args, Py_ssize_t nargs,
           PyObject* kwnames, In& in) {
  static_assert(N <= 64, "one bit per field");
  uint64_t seen = 0;
  if (nargs > static_cast<Py_ssize_t>(N)) type_error(std::string(fn) + "() takes at most " + std::to_string(N) + " arguments");
  for (Py_ssize_t i = 0; i < nargs; ++i) {
    fields[i].set(in, args[i], fields[i].name);
    seen |= uint64_t(1) << i;
  }
  const Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
  size_t hint = static_cast<size_t>(nargs);  // callers pass keywords in field order: try the next field first
  for (Py_ssize_t i = 0; i < nkw; ++i) {
    PyObject* name = PyTuple_GET_ITEM(kwnames, i);
    size_t f = N;
    for (size_t t = 0; t < N && f == N; ++t) {
      const size_t j = (hint + t) % N;
      if (!fields[j].key) fields[j].key = PyUnicode_InternFromString(fields[j].name);
      if (fields[j].key == name) f = j;
    }
    for (size_t j = 0; j < N && f == N; ++j)  // a name built at run time (e.g. **kwargs), not interned
      if (PyUnicode_Compare(fields[j].key, name) == 0) f = j;
    if (f == N) {
      PyErr_Clear();
      type_error(std::string(fn) + "() got an unexpected keyword argument '" + PyUnicode_AsUTF8(name) + "'");
    }
    if (seen & (uint64_t(1) << f))
      type_error(std::string(fn) + "() got multiple values for argument '" + fields[f].name + "'");
    fields[f].set(in, args[nargs + i], fields[f].name);
    seen |= uint64_t(1) << f;
    hint = f + 1;
  }
  for (size_t j = 0; j < N; ++j)
    if (fields[j].required && !(seen & (uint64_t(1) << j)))
      type_error(std::string(fn) + "() missing required argument '" + fields[j].name + "'");
}

// The same from a dict (gemm_pair's two products).
template <typename In, size_t N>
void parse_dict(const char* fn, std::array<Field<In>, N>& fields, PyObject* dict, In& in) {
  if (!PyDict_Check(dict)) type_error(std::string(fn) + "() takes dicts of gemm's arguments");
  std::vector<PyObject*> values;
  py::tuple names(PyDict_Size(dict));
  Py_ssize_t pos = 0, i = 0;
  PyObject *key, *value;
  while (PyDict_Next(dict, &pos, &key, &value)) {
    values.push_back(value);
    Py_INCREF(key);
    PyTuple_SET_ITEM(names.ptr(), i++, key);
  }
  parse(fn, fields, values.data(), 0, names.ptr(), in);
}

// A binding: parses into In and runs Op(in); C++ exceptions become Python's (std::invalid_argument: ValueError,
// std::bad_alloc: MemoryError, others: RuntimeError).
template <typename In, size_t N, void (*Op)(const In&)>
PyObject* binding(const char* fn, std::array<Field<In>, N>& fields, PyObject* const* args, Py_ssize_t nargs,
                  PyObject* kwnames) {
  try {
    In in;
    parse(fn, fields, args, nargs, kwnames, in);
    Op(in);
    Py_RETURN_NONE;
  } catch (py::builtin_exception& e) {
    e.set_error();
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

// ---- extent checks ----

constexpr int64_t kMax = std::numeric_limits<int64_t>::max();

// a * b for non-negative a, b, or -1 when it overflows int64.
int64_t mul_or_neg(int64_t a, int64_t b) { return (b != 0 && a > kMax / b) ? -1 : a * b; }

// One dimension of an array as a kernel walks it: `size` elements `stride` elements apart.
struct Dim {
  int64_t size, stride;
};

// Checks that every element of an array of `itemsize`-byte elements with these dims (sizes >= 1, strides >= 0),
// first element at b's pointer, lies inside b, and returns the pointer. An optional buffer may be (0, 0): then
// nothing is touched and nullptr comes back. This is the extent check of every pointer this module passes on.
template <typename P>
P checked(const Buf& b, const char* name, int64_t itemsize, std::initializer_list<Dim> dims, bool optional = false) {
  if (b.ptr == 0) {
    if (!optional) fail(std::string(name) + " is a null pointer");
    return nullptr;
  }
  int64_t last = 0;  // element offset of the farthest element touched
  for (const Dim& d : dims) {
    if (d.size < 1 || d.stride < 0) fail(std::string(name) + ": sizes must be >= 1 and strides >= 0");
    const int64_t step = mul_or_neg(d.size - 1, d.stride);
    if (step < 0 || last > kMax - step) fail(std::string(name) + ": extent overflows int64");
    last += step;
  }
  const int64_t need = last < kMax ? mul_or_neg(last + 1, itemsize) : -1;
  if (need < 0 || b.bytes < need)
    fail(std::string(name) + " reaches " + std::to_string(need) + " bytes past its pointer, but its storage holds " +
         std::to_string(b.bytes) + " from there");
  return reinterpret_cast<P>(b.ptr);
}

// Elements of a contiguous array of these sizes (each >= 1), as one Dim.
Dim dense(std::initializer_list<int64_t> sizes) {
  int64_t n = 1;
  for (int64_t s : sizes) {
    n = s >= 0 ? mul_or_neg(n, s) : -1;
    require(n >= 0, "array size overflows int64");
  }
  return {n, 1};
}

}  // namespace
}  // namespace minillm_py
