#include "zeal/parallel/schedule.h"

#include <algorithm>
#include <map>
#include <sstream>
#include <tuple>

#include "zeal/core/error.h"

namespace zeal::parallel {
namespace {

struct Unit {
  int micro_batch;
  int chunk;
};

class Builder {
 public:
  explicit Builder(const ScheduleSpec& spec) : s_(spec), last_(spec.stages * spec.chunks - 1) {}

  void forward(Unit u, bool with_grads_later = true) {
    (void)with_grads_later;
    const int vs = virtual_stage(s_, u.chunk);
    if (vs == 0 || vs == last_) out_.push_back({Op::kLoadMicroBatch, u.micro_batch, u.chunk});
    if (vs != 0) out_.push_back({Op::kRecvActivation, u.micro_batch, u.chunk});
    out_.push_back({Op::kForward, u.micro_batch, u.chunk});
    if (vs != last_) out_.push_back({Op::kSendActivation, u.micro_batch, u.chunk});
  }
  void backward(Unit u) {
    const int vs = virtual_stage(s_, u.chunk);
    if (vs != last_) out_.push_back({Op::kRecvGrad, u.micro_batch, u.chunk});
    out_.push_back({Op::kBackward, u.micro_batch, u.chunk});
    if (vs != 0) out_.push_back({Op::kSendGrad, u.micro_batch, u.chunk});
  }
  std::vector<Instruction> finish(bool training) {
    if (training) {
      out_.push_back({Op::kReduceGrads, -1, 0});
      out_.push_back({Op::kOptimizerStep, -1, 0});
    }
    return std::move(out_);
  }

 private:
  ScheduleSpec s_;
  int last_;
  std::vector<Instruction> out_;
};

// Megatron-LM's order of (micro-batch, chunk) units for interleaving: groups of p micro-batches
// go through chunk 0, then chunk 1, ...; backwards visit the chunks in reverse.
Unit interleaved_unit(const ScheduleSpec& s, int k, bool forward) {
  const int group = k / (s.stages * s.chunks), within = k % (s.stages * s.chunks);
  const int chunk = within / s.stages;
  return {group * s.stages + within % s.stages, forward ? chunk : s.chunks - 1 - chunk};
}

}  // namespace

const char* to_string(Op op) {
  switch (op) {
    case Op::kLoadMicroBatch: return "LoadMicroBatch";
    case Op::kRecvActivation: return "RecvActivation";
    case Op::kForward: return "Forward";
    case Op::kSendActivation: return "SendActivation";
    case Op::kRecvGrad: return "RecvGrad";
    case Op::kBackward: return "Backward";
    case Op::kSendGrad: return "SendGrad";
    case Op::kReduceGrads: return "ReduceGrads";
    case Op::kOptimizerStep: return "OptimizerStep";
  }
  return "?";
}

std::string to_string(const Instruction& in) {
  static const std::map<Op, const char*> shorthand = {
      {Op::kLoadMicroBatch, "L"}, {Op::kRecvActivation, "RA"}, {Op::kForward, "F"}, {Op::kSendActivation, "SA"},
      {Op::kRecvGrad, "RG"},      {Op::kBackward, "B"},        {Op::kSendGrad, "SG"}, {Op::kReduceGrads, "RED"},
      {Op::kOptimizerStep, "STEP"}};
  std::string out = shorthand.at(in.op);
  if (in.micro_batch >= 0) out += std::to_string(in.micro_batch);
  if (in.chunk > 0) out += "." + std::to_string(in.chunk);
  return out;
}

std::string to_string(const std::vector<Instruction>& schedule) {
  std::string out;
  for (const Instruction& in : schedule) out += (out.empty() ? "" : " ") + to_string(in);
  return out;
}

const char* to_string(ScheduleKind kind) {
  switch (kind) {
    case ScheduleKind::kInference: return "inference";
    case ScheduleKind::kFillDrain: return "fill_drain";
    case ScheduleKind::kOneFOneB: return "1f1b";
    case ScheduleKind::kInterleaved: return "interleaved";
  }
  return "?";
}

ScheduleKind schedule_kind_from_string(const std::string& name) {
  for (ScheduleKind k : {ScheduleKind::kInference, ScheduleKind::kFillDrain, ScheduleKind::kOneFOneB,
                         ScheduleKind::kInterleaved})
    if (name == to_string(k)) return k;
  throw ConfigError("pipeline schedule '" + name + "': expected one of inference, fill_drain, 1f1b, interleaved");
}

std::vector<Instruction> make_schedule(ScheduleKind kind, const ScheduleSpec& s) {
  ZEAL_CHECK(s.stages >= 1, "pipeline schedule: stages must be >= 1, got ", s.stages);
  ZEAL_CHECK(s.stage >= 0 && s.stage < s.stages, "pipeline schedule: stage ", s.stage, " is outside 0..", s.stages - 1);
  ZEAL_CHECK(s.micro_batches >= 1, "pipeline schedule: micro_batches must be >= 1, got ", s.micro_batches);
  ZEAL_CHECK(s.chunks >= 1, "pipeline schedule: chunks must be >= 1, got ", s.chunks);
  ZEAL_CHECK(kind == ScheduleKind::kInterleaved || kind == ScheduleKind::kInference || s.chunks == 1,
             "pipeline schedule ", to_string(kind), " has one chunk per stage, got ", s.chunks,
             " (interleaved and inference schedules take several)");
  Builder b(s);
  const int p = s.stages, m = s.micro_batches;
  switch (kind) {
    case ScheduleKind::kInference:
      if (s.chunks == 1) {
        for (int i = 0; i < m; ++i) b.forward({i, 0});
      } else {  // the interleaved schedule's forwards alone, in its order
        ZEAL_CHECK(m % p == 0, "interleaved inference schedule: micro_batches (", m,
                   ") must be a multiple of the number of stages (", p, ")");
        for (int k = 0; k < m * s.chunks; ++k) b.forward(interleaved_unit(s, k, true));
      }
      return b.finish(false);
    case ScheduleKind::kFillDrain:
      for (int i = 0; i < m; ++i) b.forward({i, 0});
      for (int i = 0; i < m; ++i) b.backward({i, 0});
      return b.finish(true);
    case ScheduleKind::kOneFOneB: {
      // Stage s runs p - s - 1 forwards ahead, so at most p - s activations are alive at once.
      const int warmup = std::min(p - s.stage - 1, m);
      for (int i = 0; i < warmup; ++i) b.forward({i, 0});
      for (int i = 0; i < m - warmup; ++i) {
        b.forward({warmup + i, 0});
        b.backward({i, 0});
      }
      for (int i = m - warmup; i < m; ++i) b.backward({i, 0});
      return b.finish(true);
    }
    case ScheduleKind::kInterleaved: {
      ZEAL_CHECK(m % p == 0, "interleaved pipeline schedule: micro_batches (", m,
                 ") must be a multiple of the number of stages (", p, ")");
      const int total = m * s.chunks;
      // The extra (v - 1) p forwards fill every chunk before the first backward comes back;
      // with m == p there is no steady state and every forward goes first.
      const int warmup = m == p ? total : std::min((p - s.stage - 1) * 2 + (s.chunks - 1) * p, total);
      for (int k = 0; k < warmup; ++k) b.forward(interleaved_unit(s, k, true));
      for (int k = 0; k < total - warmup; ++k) {
        b.forward(interleaved_unit(s, warmup + k, true));
        b.backward(interleaved_unit(s, k, false));
      }
      for (int k = total - warmup; k < total; ++k) b.backward(interleaved_unit(s, k, false));
      return b.finish(true);
    }
  }
  ZEAL_INTERNAL_ASSERT(false, "unhandled schedule kind");
  return {};
}

namespace {

struct Simulation {
  double makespan = 0.0;
  std::vector<double> busy;
};

Simulation run_simulation(ScheduleKind kind, int p, int m, int v, double tf, double tb) {
  std::vector<std::vector<Instruction>> lists;
  for (int s = 0; s < p; ++s) lists.push_back(make_schedule(kind, {p, s, m, v}));
  const int last = p * v - 1;
  // A message: (kind 0 = activation / 1 = gradient, micro-batch, receiving virtual stage) -> time sent.
  std::map<std::tuple<int, int, int>, double> sent;
  // Per channel (from stage, to stage, kind): the order of sends and of receives, to compare.
  std::map<std::tuple<int, int, int>, std::vector<std::pair<int, int>>> send_order, recv_order;
  std::vector<size_t> next(p, 0);
  std::vector<double> clock(p, 0.0), busy(p, 0.0);
  auto stage_of = [&](int vs) { return vs % p; };
  for (bool moved = true; moved;) {
    moved = false;
    for (int s = 0; s < p; ++s) {
      while (next[s] < lists[s].size()) {
        const Instruction& in = lists[s][next[s]];
        const int vs = in.chunk * p + s;
        if (in.op == Op::kRecvActivation || in.op == Op::kRecvGrad) {
          const int type = in.op == Op::kRecvActivation ? 0 : 1;
          auto it = sent.find({type, in.micro_batch, vs});
          if (it == sent.end()) break;  // blocked: its message is not there yet
          clock[s] = std::max(clock[s], it->second);
          const int from = stage_of(type == 0 ? vs - 1 : vs + 1);
          recv_order[{from, s, type}].push_back({in.micro_batch, in.chunk});
        } else if (in.op == Op::kSendActivation || in.op == Op::kSendGrad) {
          const int type = in.op == Op::kSendActivation ? 0 : 1;
          const int to_vs = type == 0 ? vs + 1 : vs - 1;
          ZEAL_INTERNAL_ASSERT(to_vs >= 0 && to_vs <= last, "a send past the pipeline's ends");
          sent[{type, in.micro_batch, to_vs}] = clock[s];
          send_order[{s, stage_of(to_vs), type}].push_back({in.micro_batch, to_vs / p});
        } else if (in.op == Op::kForward || in.op == Op::kBackward) {
          const double t = in.op == Op::kForward ? tf : tb;
          clock[s] += t;
          busy[s] += t;
        }
        ++next[s];
        moved = true;
      }
    }
  }
  std::string stuck;
  for (int s = 0; s < p; ++s)
    if (next[s] < lists[s].size()) stuck += " stage " + std::to_string(s) + " at " + to_string(lists[s][next[s]]) + ";";
  ZEAL_CHECK(stuck.empty(), "pipeline schedule ", to_string(kind), " (", p, " stages, ", m, " micro-batches, ", v,
             " chunks) deadlocks:", stuck);
  for (const auto& [channel, sends] : send_order) {
    const auto& [from, to, type] = channel;
    ZEAL_CHECK(recv_order[channel] == sends, "pipeline schedule ", to_string(kind), ": stage ", from, " sends ",
               type == 0 ? "activations" : "gradients", " to stage ", to, " in another order than it receives them");
  }
  return {*std::max_element(clock.begin(), clock.end()), busy};
}

}  // namespace

double simulate(ScheduleKind kind, int stages, int micro_batches, int chunks, double forward_time,
                double backward_time) {
  return run_simulation(kind, stages, micro_batches, chunks, forward_time, backward_time).makespan;
}

double simulated_bubble(ScheduleKind kind, int stages, int micro_batches, int chunks, double forward_time,
                        double backward_time) {
  Simulation sim = run_simulation(kind, stages, micro_batches, chunks, forward_time, backward_time);
  double idle = 0.0;
  for (double b : sim.busy) idle += 1.0 - b / sim.makespan;
  return idle / static_cast<double>(stages);
}

}  // namespace zeal::parallel
