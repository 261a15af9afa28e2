// The NCCL backend for device tensors (built when CUDA is found: ZEAL_WITH_CUDA). See the block
// comment at the top of src/comm/nccl_backend.cpp for its stream and threading model.
#pragma once

#include "zeal/comm/communicator.h"

namespace zeal::comm {

// A communicator over the same ranks as `host_world`, on CUDA device `device`. Collective over
// host_world: rank 0 creates the NCCL id and broadcasts it through host_world.
CommunicatorPtr nccl_world(const CommunicatorPtr& host_world, int device, Timeout default_timeout);

}  // namespace zeal::comm
