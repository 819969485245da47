#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/config.h"
#include "core/error.h"
#include "core/safetensors.h"
#include "tests/common.h"

using namespace hla;

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(3.140625f)), 3.140625f);
  // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: even mantissa wins (1.0).
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.00390625f)), 1.0f);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.01171875f)), 1.015625f);
}

TEST(DType, F16RoundTrip) {
  for (float f : {0.0f, 1.0f, -2.5f, 65504.0f, 6.1035156e-05f, 5.9604645e-08f, 0.333251953125f})
    EXPECT_EQ(f16_to_f32(f32_to_f16(f)), f) << f;
  EXPECT_EQ(f16_to_f32(f32_to_f16(1e6f)), INFINITY);
}

TEST(Tensor, StridedViewsAndConversion) {
  Tensor t = Tensor::f32({2, 3});
  for (int i = 0; i < 6; ++i) t.f32()[i] = float(i);
  Tensor tt = t.transpose(0, 1);
  EXPECT_FALSE(tt.is_contiguous());
  EXPECT_EQ(tt.at({2, 1}), 5.0);
  Tensor c = tt.contiguous();
  EXPECT_EQ(c.shape(), (Shape{3, 2}));
  EXPECT_EQ(c.f32()[1], 3.0f);
  Tensor b = t.to(DType::BF16).to_f32();
  EXPECT_EQ(b.f32()[5], 5.0f);
  EXPECT_EQ(t.narrow(1, 1, 2).at({1, 0}), 4.0);
}

TEST(SafeTensors, WriteReadRoundTrip) {
  TempDir dir;
  Tensor a = Tensor::f32({2, 2});
  a.f32()[3] = 7.5f;
  Tensor ids = Tensor::zeros(DType::I64, {3});
  ids.data<int64_t>()[2] = 1234567890123;
  write_safetensors(dir / "x.safetensors", {{"a", a}, {"ids", ids}, {"h", a.to(DType::BF16)}},
                    {{"format", "pt"}});
  SafeTensorsFile f(dir / "x.safetensors");
  EXPECT_EQ(f.get("a").at({1, 1}), 7.5);
  EXPECT_EQ(f.get("ids").data<int64_t>()[2], 1234567890123);
  EXPECT_EQ(f.get("h").dtype(), DType::BF16);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_THROW(f.get("nope"), Error);
}

TEST(SafeTensors, ReadsShardedFixture) {
  HLA_REQUIRE_FIXTURES();
  Checkpoint ck(fixture("models/qwen3_5_vl"));
  Tensor e = ck.get("model.language_model.embed_tokens.weight");
  EXPECT_EQ(e.dtype(), DType::BF16);
  EXPECT_EQ(e.shape(), (Shape{320, 64}));
}

// Every defect of a safetensors image must become an hla::Error that names the file.
TEST(SafeTensors, CorruptFilesGiveClearErrors) {
  TempDir dir;
  Tensor a = Tensor::f32({4, 4});
  write_safetensors(dir / "good.safetensors", {{"w", a}});
  std::string good = read_file(dir / "good.safetensors");
  auto expect_error = [&](const std::string& bytes, const std::string& needle) {
    std::string p = dir / "bad.safetensors";
    write_file(p, bytes);
    try {
      SafeTensorsFile f(p);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("bad.safetensors"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error("", "shorter than");
  expect_error(good.substr(0, 20), "past the end");           // header cut short
  expect_error(good.substr(0, good.size() - 4), "past the end");  // data cut short
  std::string huge = good;
  uint64_t n = 1ull << 40;
  std::memcpy(huge.data(), &n, 8);
  expect_error(huge, "limit");
  std::string notjson = good;
  notjson[8] = '[';
  expect_error(notjson, "");
  auto with_header = [&](const std::string& h) {
    std::string s(8, '\0');
    uint64_t len = h.size();
    std::memcpy(s.data(), &len, 8);
    return s + h + std::string(64, '\0');
  };
  expect_error(with_header(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,1000]}})"), "past the end");
  expect_error(with_header(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}})"), "does not match");
  expect_error(with_header(R"({"w":{"dtype":"Q4","shape":[4],"data_offsets":[0,16]}})"), "dtype");
  expect_error(with_header(R"({"w":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})"), "dimension");
  expect_error(with_header(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"v":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})"), "overlap");
}

TEST(Config, FieldErrorsNameTheField) {
  Config c = Config::parse(R"({"a": 3, "b": "x", "t": {"n": 1.5}, "l": [1, 2]})", "cfg.json");
  EXPECT_EQ(c.get_int("a"), 3);
  EXPECT_EQ(c.get_int("zz", 9), 9);
  EXPECT_EQ(c.get_int_list("l"), (std::vector<int64_t>{1, 2}));
  try {
    c.sub("t").get_int("n");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "cfg.json: field 't.n' must be an integer");
  }
  EXPECT_THROW(c.get_int("b"), Error);
  EXPECT_THROW(c.get_double("missing"), Error);
  EXPECT_THROW(Config::parse("{bad", "cfg.json"), Error);
}
