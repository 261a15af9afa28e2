// The publish protocol of Note [Atomic checkpoints] (checkpoint/checkpoint.h), written once: the
// plain engine's save and a save in parts (pipeline stages, tensor ranks) both go through it.
//
//   1. agree    rank 0 makes <save_dir>/.tmp-<tag> (removing the remains of a save that died);
//               every rank learns whether it could before anyone writes.
//   2. write    each rank writes its files under the temporary name; a failure on any rank
//               fails every rank, named (agree_or_throw), so none waits on a barrier a failed
//               rank never reaches.
//   3. rename   rank 0 seals the directory (manifest, fsync), renames it to <tag> (an older <tag>
//               moves aside first and is removed after), fsyncs <save_dir>, and only then
//   4. latest   replaces `latest` atomically. A crash before 4 leaves `latest` naming the
//               previous complete checkpoint; a crash between 3 and 4 leaves a complete <tag>.
#pragma once

#include <functional>
#include <string>

#include "zeal/comm/communicator.h"

namespace zeal::checkpoint {

// Every rank of `group` learns whether any rank failed: throws CheckpointError naming `what` and
// this rank's error, or that another rank failed.
void agree_or_throw(comm::Communicator& group, const std::string& local_error, const std::string& what);

class AtomicSave {
 public:
  // Step 1. Collective over `group`.
  AtomicSave(comm::CommunicatorPtr group, const std::string& save_dir, const std::string& tag);

  const std::string& tmp_dir() const { return tmp_dir_; }
  const std::string& final_dir() const { return final_dir_; }

  // Step 2: `write` runs on this rank when `here`; then every rank agrees. Collective.
  void write(const std::string& what, bool here, const std::function<void()>& write);
  // Steps 3 and 4: rank 0 runs `seal` (writes the manifest into tmp_dir()), then publishes.
  // `before_rename` (tests inject crashes there) runs on rank 0 just before the rename. Collective.
  void publish(bool save_latest, const std::function<void()>& seal,
               const std::function<void()>& before_rename = nullptr);

 private:
  comm::CommunicatorPtr group_;
  std::string save_dir_, tag_, tmp_dir_, final_dir_;
};

}  // namespace zeal::checkpoint
