// Pipeline schedules as data: for one stage of a pipeline, the ordered list of instructions that
// stage runs for one global batch of micro-batches. Pure functions of (stages, stage, micro
// batches, chunks): no communicator, no model, no globals; an executor (python/zeal/pipe) runs the
// list. See docs/pipeline.md for the schedules and their bubbles.
//
// Virtual stages. With `chunks` = v > 1 (interleaved 1F1B) the model is cut into p * v parts and
// stage s holds parts s, p + s, 2p + s, ...: chunk c of stage s is virtual stage c * p + s. With
// v = 1 the virtual stage is the stage. Activations go from virtual stage k to k + 1 (from stage
// p - 1 back to stage 0 between chunks), gradients the other way.
//
// Message order. Every Send has exactly one matching Recv on the neighbouring stage, and along
// each (sender, receiver, kind) channel the sends and the receives come in the same order, so an
// executor that posts sends without waiting and receives in instruction order cannot deadlock
// (tests/cpp/test_schedule.cpp runs every stage's list together to check it).
#pragma once

#include <string>
#include <vector>

namespace zeal::parallel {

enum class Op {
  kLoadMicroBatch,   // first virtual stage: the inputs; last virtual stage: the labels
  kRecvActivation,   // from the previous virtual stage
  kForward,
  kSendActivation,   // to the next virtual stage
  kRecvGrad,         // from the next virtual stage
  kBackward,
  kSendGrad,         // to the previous virtual stage
  kReduceGrads,      // data-parallel (and tied-weight) gradient reduction, once per batch
  kOptimizerStep,
};

struct Instruction {
  Op op;
  int micro_batch = -1;  // -1 for the per-batch instructions
  int chunk = 0;         // the stage's model chunk (interleaved schedules)
  bool operator==(const Instruction& other) const {
    return op == other.op && micro_batch == other.micro_batch && chunk == other.chunk;
  }
};

const char* to_string(Op op);
// "F3" (forward of micro-batch 3), "F3.1" (its chunk 1), "SA3", "RG2", "B0", "L1", "RED", "STEP".
std::string to_string(const Instruction& instruction);
std::string to_string(const std::vector<Instruction>& schedule);  // space-separated

enum class ScheduleKind {
  kInference,    // forwards only, fill and drain
  kFillDrain,    // GPipe: every forward, then every backward
  kOneFOneB,     // PipeDream-flush: warm up, alternate one forward and one backward, cool down
  kInterleaved,  // 1F1B over virtual stages (Megatron-LM's interleaving); chunks > 1
};

const char* to_string(ScheduleKind kind);
ScheduleKind schedule_kind_from_string(const std::string& name);  // "inference", "fill_drain", "1f1b", "interleaved"

struct ScheduleSpec {
  int stages = 1;        // p
  int stage = 0;         // this stage, 0 <= stage < p
  int micro_batches = 1; // m
  int chunks = 1;        // v: model chunks per stage (interleaved only)
};

// Checks the spec (ZEAL_CHECK with the offending values) and builds the stage's list. Training
// schedules end with ReduceGrads and OptimizerStep. Interleaving needs m to be a multiple of p.
std::vector<Instruction> make_schedule(ScheduleKind kind, const ScheduleSpec& spec);

// The virtual stage of (stage, chunk), and how many there are.
inline int virtual_stage(const ScheduleSpec& s, int chunk) { return chunk * s.stages + s.stage; }

// Runs every stage's list together on a clock: a forward of one chunk takes `forward_time`, its
// backward `backward_time`, communication and everything else nothing; a Recv waits for its Send.
// Returns the time the last stage finishes (the makespan). Throws zeal::Error naming the stuck
// stages and their next instructions if the lists deadlock, and naming the channel if sends and
// receives along one come in different orders.
double simulate(ScheduleKind kind, int stages, int micro_batches, int chunks, double forward_time,
                double backward_time);
// 1 - (busy time of a stage) / makespan, averaged over the stages: the idle share of the pipeline.
double simulated_bubble(ScheduleKind kind, int stages, int micro_batches, int chunks, double forward_time = 1.0,
                        double backward_time = 2.0);

}  // namespace zeal::parallel
