#include <gtest/gtest.h>

#include <map>
#include <set>
#include <tuple>

#include "zeal/core/error.h"
#include "zeal/parallel/schedule.h"

using namespace zeal::parallel;

namespace {

std::string schedule(ScheduleKind kind, int p, int s, int m, int v = 1) {
  return to_string(make_schedule(kind, {p, s, m, v}));
}

}  // namespace

// Written out by hand: 1F1B on 3 stages, 4 micro-batches. The first stage runs two forwards ahead,
// the middle one, the last none; the last stage loads the labels and sends no activations.
TEST(Schedule, OneFOneBThreeStagesFourMicroBatches) {
  EXPECT_EQ(schedule(ScheduleKind::kOneFOneB, 3, 0, 4),
            "L0 F0 SA0 L1 F1 SA1 L2 F2 SA2 RG0 B0 L3 F3 SA3 RG1 B1 RG2 B2 RG3 B3 RED STEP");
  EXPECT_EQ(schedule(ScheduleKind::kOneFOneB, 3, 1, 4),
            "RA0 F0 SA0 RA1 F1 SA1 RG0 B0 SG0 RA2 F2 SA2 RG1 B1 SG1 RA3 F3 SA3 RG2 B2 SG2 RG3 B3 SG3 RED STEP");
  EXPECT_EQ(schedule(ScheduleKind::kOneFOneB, 3, 2, 4),
            "L0 RA0 F0 B0 SG0 L1 RA1 F1 B1 SG1 L2 RA2 F2 B2 SG2 L3 RA3 F3 B3 SG3 RED STEP");
}

TEST(Schedule, OneFOneBWithFewerMicroBatchesThanStages) {
  EXPECT_EQ(schedule(ScheduleKind::kOneFOneB, 3, 0, 1), "L0 F0 SA0 RG0 B0 RED STEP");
  EXPECT_EQ(schedule(ScheduleKind::kOneFOneB, 3, 1, 1), "RA0 F0 SA0 RG0 B0 SG0 RED STEP");
  EXPECT_EQ(schedule(ScheduleKind::kOneFOneB, 3, 2, 1), "L0 RA0 F0 B0 SG0 RED STEP");
  EXPECT_EQ(schedule(ScheduleKind::kOneFOneB, 1, 0, 3), "L0 F0 B0 L1 F1 B1 L2 F2 B2 RED STEP");
}

TEST(Schedule, FillDrainAndInference) {
  EXPECT_EQ(schedule(ScheduleKind::kFillDrain, 2, 0, 3), "L0 F0 SA0 L1 F1 SA1 L2 F2 SA2 RG0 B0 RG1 B1 RG2 B2 RED STEP");
  EXPECT_EQ(schedule(ScheduleKind::kFillDrain, 2, 1, 3),
            "L0 RA0 F0 L1 RA1 F1 L2 RA2 F2 B0 SG0 B1 SG1 B2 SG2 RED STEP");
  EXPECT_EQ(schedule(ScheduleKind::kInference, 2, 1, 2), "L0 RA0 F0 L1 RA1 F1");
  // Over chunks (an interleaved model's eval): the interleaved forwards in their order.
  EXPECT_EQ(schedule(ScheduleKind::kInference, 2, 0, 2, 2), "L0 F0 SA0 L1 F1 SA1 RA0.1 F0.1 SA0.1 RA1.1 F1.1 SA1.1");
  EXPECT_EQ(schedule(ScheduleKind::kInference, 2, 1, 2, 2), "RA0 F0 SA0 RA1 F1 SA1 L0.1 RA0.1 F0.1 L1.1 RA1.1 F1.1");
}

// Interleaved, 2 stages x 2 chunks, 4 micro-batches (Megatron-LM's order): groups of p micro-batches
// go through chunk 0, then chunk 1; stage 0 warms up with (p - 1) * 2 + (v - 1) * p = 4 forwards.
TEST(Schedule, InterleavedTwoStagesTwoChunks) {
  EXPECT_EQ(schedule(ScheduleKind::kInterleaved, 2, 0, 4, 2),
            "L0 F0 SA0 L1 F1 SA1 RA0.1 F0.1 SA0.1 RA1.1 F1.1 SA1.1 "
            "L2 F2 SA2 RG0.1 B0.1 SG0.1 L3 F3 SA3 RG1.1 B1.1 SG1.1 "
            "RA2.1 F2.1 SA2.1 RG0 B0 RA3.1 F3.1 SA3.1 RG1 B1 "
            "RG2.1 B2.1 SG2.1 RG3.1 B3.1 SG3.1 RG2 B2 RG3 B3 RED STEP");
  EXPECT_EQ(schedule(ScheduleKind::kInterleaved, 2, 1, 4, 2),
            "RA0 F0 SA0 RA1 F1 SA1 L0.1 RA0.1 F0.1 B0.1 SG0.1 L1.1 RA1.1 F1.1 B1.1 SG1.1 "
            "RA2 F2 SA2 RG0 B0 SG0 RA3 F3 SA3 RG1 B1 SG1 "
            "L2.1 RA2.1 F2.1 B2.1 SG2.1 L3.1 RA3.1 F3.1 B3.1 SG3.1 RG2 B2 SG2 RG3 B3 SG3 RED STEP");
}

// Every kind, stage count and micro-batch count of the issue: each (micro-batch, chunk) is run
// forward once and backward once, after its forward; all stages together neither deadlock nor
// receive out of order (simulate throws otherwise); 1F1B keeps at most p - s activations alive.
TEST(Schedule, PropertiesOverManyShapes) {
  for (int p : {1, 2, 3, 4, 5}) {
    for (int m : {1, 3, 8, 10, 12, 20}) {
      for (ScheduleKind kind : {ScheduleKind::kInference, ScheduleKind::kFillDrain, ScheduleKind::kOneFOneB,
                                ScheduleKind::kInterleaved}) {
        for (int v : {1, 2, 3}) {
          if (kind != ScheduleKind::kInterleaved && kind != ScheduleKind::kInference && v > 1) continue;
          if (kind == ScheduleKind::kInterleaved && v == 1) continue;
          if (v > 1 && m % p != 0) continue;
          const std::string where = std::string(to_string(kind)) + " p=" + std::to_string(p) + " m=" +
                                    std::to_string(m) + " v=" + std::to_string(v);
          for (int s = 0; s < p; ++s) {
            std::map<std::pair<int, int>, int> forward_at, backward_at;
            int alive = 0, peak = 0;
            const auto list = make_schedule(kind, {p, s, m, v});
            for (size_t i = 0; i < list.size(); ++i) {
              const Instruction& in = list[i];
              if (in.op == Op::kForward) {
                EXPECT_TRUE(forward_at.emplace(std::pair{in.micro_batch, in.chunk}, int(i)).second) << where;
                peak = std::max(peak, ++alive);
              }
              if (in.op == Op::kBackward) {
                EXPECT_TRUE(backward_at.emplace(std::pair{in.micro_batch, in.chunk}, int(i)).second) << where;
                EXPECT_LT(forward_at.at({in.micro_batch, in.chunk}), int(i)) << where;
                --alive;
              }
            }
            EXPECT_EQ(forward_at.size(), size_t(m * v)) << where;
            EXPECT_EQ(backward_at.size(), kind == ScheduleKind::kInference ? 0u : size_t(m * v)) << where;
            if (kind == ScheduleKind::kOneFOneB) EXPECT_LE(peak, p - s) << where;
          }
          EXPECT_NO_THROW(simulate(kind, p, m, v, 1.0, 2.0)) << where;
        }
      }
    }
  }
}

// With equal work per micro-batch and free communication, 1F1B and fill-drain idle for
// (p - 1) / (m + p - 1) of the time, and interleaving with v chunks for (p - 1) / (v m + p - 1).
TEST(Schedule, SimulatedBubbleIsTheTheoreticalOne) {
  for (int p : {2, 4}) {
    for (int m : {4, 8, 16, 32}) {
      const double one = double(p - 1) / double(m + p - 1);
      EXPECT_NEAR(simulated_bubble(ScheduleKind::kOneFOneB, p, m, 1), one, 1e-12) << p << " " << m;
      EXPECT_NEAR(simulated_bubble(ScheduleKind::kFillDrain, p, m, 1), one, 1e-12) << p << " " << m;
      for (int v : {2, 4}) {
        const double interleaved = double(p - 1) / double(v * m + p - 1);
        EXPECT_NEAR(simulated_bubble(ScheduleKind::kInterleaved, p, m, v), interleaved, 1e-12)
            << p << " " << m << " " << v;
      }
    }
  }
}

TEST(Schedule, RejectsBadShapes) {
  auto message = [](auto fn) {
    try {
      fn();
    } catch (const zeal::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(message([] { make_schedule(ScheduleKind::kInterleaved, {4, 0, 6, 2}); }).find("multiple of the number of stages"),
            std::string::npos);
  EXPECT_NE(message([] { make_schedule(ScheduleKind::kOneFOneB, {2, 0, 4, 2}); }).find("one chunk per stage"),
            std::string::npos);
  EXPECT_NE(message([] { make_schedule(ScheduleKind::kOneFOneB, {2, 2, 4, 1}); }).find("stage 2 is outside"),
            std::string::npos);
  EXPECT_NE(message([] { schedule_kind_from_string("zigzag"); }).find("1f1b"), std::string::npos);
}
