// Status codes at the C edge, typed exceptions above it (STYLE.md habit 3; docs/errors.md): one
// vocabulary for checking the calls into MPI, CUDA and NCCL. core depends on none of those
// libraries: the macros expand where the library's own header is included (the MPI error text
// helper is defined only when mpi.h came first). Each message names the call, the library's
// description of the status, and the file:line.
#pragma once

#include "zeal/core/error.h"

// The call returned something other than `ok`: raise ErrorType with describe(status).
#define ZEAL_STATUS_CHECK(ErrorType, call, ok, describe)                                                    \
  do {                                                                                                      \
    const auto zeal_status = (call);                                                                        \
    if (zeal_status != (ok))                                                                                \
      throw ErrorType(::zeal::detail::concat(#call, " failed: ", describe(zeal_status), " (at ", __FILE__, \
                                             ":", __LINE__, ")"));                                          \
  } while (0)

#ifdef MPI_SUCCESS
namespace zeal::detail {
inline std::string mpi_error_text(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) return "MPI error " + std::to_string(code);
  return std::string(text, static_cast<size_t>(length));
}
}  // namespace zeal::detail
// An MPI call (comm layer): CommError.
#define MPI_CHECK(call) ZEAL_STATUS_CHECK(::zeal::CommError, call, MPI_SUCCESS, ::zeal::detail::mpi_error_text)
#endif

// A CUDA runtime call: Error (a device fault is not a communication failure of its own).
#define CUDA_CHECK(call) ZEAL_STATUS_CHECK(::zeal::Error, call, cudaSuccess, cudaGetErrorString)
// An NCCL call: CommError.
#define NCCL_CHECK(call) ZEAL_STATUS_CHECK(::zeal::CommError, call, ncclSuccess, ncclGetErrorString)
