#include "zeal/comm/communicator.h"

#include "zeal/core/error.h"

namespace zeal::comm {

const char* to_string(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kAvg: return "avg";
    case ReduceOp::kMax: return "max";
    case ReduceOp::kMin: return "min";
  }
  return "?";
}

bool Work::is_completed() const { return completed_.load(std::memory_order_acquire); }

void Work::wait(Timeout timeout) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (timeout == Timeout::max()) {
    done_cv_.wait(lock, [&] { return completed_.load(); });
  } else if (!done_cv_.wait_for(lock, timeout, [&] { return completed_.load(); })) {
    throw TimeoutError(description_ + " did not complete within this wait of " + std::to_string(timeout.count()) + " ms");
  }
  if (error_) std::rethrow_exception(error_);
}

std::exception_ptr Work::exception() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return error_;
}

void Work::finish(std::exception_ptr error) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    ZEAL_INTERNAL_ASSERT(!completed_.load(), "work completed twice: ", description_);
    error_ = error;
    completed_.store(true, std::memory_order_release);
  }
  done_cv_.notify_all();
}

}  // namespace zeal::comm
