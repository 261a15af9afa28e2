#include "zeal/checkpoint/publish.h"

#include <filesystem>

#include <ATen/ATen.h>

#include "zeal/checkpoint/checkpoint.h"
#include "zeal/core/error.h"

namespace zeal::checkpoint {
namespace fs = std::filesystem;

void agree_or_throw(comm::Communicator& group, const std::string& local_error, const std::string& what) {
  at::Tensor flag = at::full({1}, local_error.empty() ? 0.0 : 1.0, at::TensorOptions().dtype(at::kFloat));
  if (group.size() > 1) group.all_reduce(flag, {comm::ReduceOp::kMax})->wait();
  if (!local_error.empty()) throw CheckpointError(what + " failed on rank " + std::to_string(group.rank()) + ": " + local_error);
  if (flag.item<float>() > 0) throw CheckpointError(what + " failed on another rank (see its error)");
}

AtomicSave::AtomicSave(comm::CommunicatorPtr group, const std::string& save_dir, const std::string& tag)
    : group_(std::move(group)),
      save_dir_(save_dir),
      tag_(tag),
      tmp_dir_((fs::path(save_dir) / (".tmp-" + tag)).string()),
      final_dir_((fs::path(save_dir) / tag).string()) {
  std::string error;
  if (group_->rank() == 0) {
    try {
      make_dirs(save_dir_);
      remove_tree(tmp_dir_);  // a previous save that died
      make_dirs(tmp_dir_);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  agree_or_throw(*group_, error, "checkpoint save (creating " + tmp_dir_ + ")");
}

void AtomicSave::write(const std::string& what, bool here, const std::function<void()>& write) {
  std::string error;
  if (here) {
    try {
      write();
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  agree_or_throw(*group_, error, "checkpoint save (" + what + ")");
}

void AtomicSave::publish(bool save_latest, const std::function<void()>& seal,
                         const std::function<void()>& before_rename) {
  std::string error;
  if (group_->rank() == 0) {
    try {
      if (seal) seal();
      fsync_dir(tmp_dir_);
      if (before_rename) before_rename();
      const std::string old_dir = (fs::path(save_dir_) / (".old-" + tag_)).string();
      remove_tree(old_dir);
      if (fs::exists(final_dir_)) rename_path(final_dir_, old_dir);
      rename_path(tmp_dir_, final_dir_);
      fsync_dir(save_dir_);
      if (save_latest) write_text_atomically((fs::path(save_dir_) / "latest").string(), tag_ + "\n");
      remove_tree(old_dir);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  agree_or_throw(*group_, error, "checkpoint save (publishing " + final_dir_ + ")");
}

}  // namespace zeal::checkpoint
