#include "migration/precopy/destination.h"

#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "api/listen.h"
#include "migration/stream/page_codec.h"
#include "vmm/base/log.h"
#include "vmm/kvm/linux_kvm.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::migration {

MigrationDestination::MigrationDestination(VmConfig local, DoneFn done)
    : local_(std::move(local)), done_(std::move(done)) {}

MigrationDestination::~MigrationDestination() {
  // A post-copy that never completed leaves guest threads blocked on missing pages. Closing the
  // userfaultfds would let the kernel zero-fill those pages under a guest that may still run, so
  // the memory layer is deliberately left alive until the process exits.
  if (postcopy_ != nullptr && !postcopy_->complete()) {
    (void)postcopy_.release();
  } else if (postcopy_ != nullptr && postcopy_vm_ != nullptr) {
    postcopy_vm_->SetVcpuWaitingProbe({});  // it points into postcopy_
    (void)postcopy_vm_->SetPassthroughPostcopy(nullptr);  // so do the BAR write gates
  }
}

void MigrationDestination::Finish(absl::StatusOr<std::unique_ptr<Vm>> result) {
  {
    absl::MutexLock lock(&mu_);
    if (finished_) return;
    finished_ = true;
  }
  done_(std::move(result));
}

absl::Status MigrationDestination::AcceptHeader(const MigrationHeader& h) {
  if (h.format_version() != kMigrationFormatVersion)
    return absl::FailedPreconditionError(absl::StrFormat(
        "incompatible migration format version %d (this VMM speaks %d)", h.format_version(),
        kMigrationFormatVersion));
  if (h.page_size() != kPageSize)
    return absl::FailedPreconditionError(
        absl::StrFormat("page size %d not supported (need %d)", h.page_size(), kPageSize));
  if (h.page_streams() == 0 || h.page_streams() > kMaxPageStreams)
    return absl::InvalidArgumentError(
        absl::StrFormat("page_streams %d outside 1..%d", h.page_streams(), kMaxPageStreams));
  if (h.migration_id().empty() || h.migration_id().size() > 64)
    return absl::InvalidArgumentError("bad migration_id");
  std::vector<RamRange> want = RamLayout(h.config().memory_mib() << 20);
  if (static_cast<size_t>(h.regions_size()) != want.size())
    return absl::FailedPreconditionError("memory layout differs from this VMM's layout");
  for (size_t i = 0; i < want.size(); ++i)
    if (h.regions(i).gpa() != want[i].gpa || h.regions(i).size() != want[i].size)
      return absl::FailedPreconditionError(absl::StrFormat(
          "memory region %d is [0x%x,+0x%x) at the source, [0x%x,+0x%x) here", i,
          h.regions(i).gpa(), h.regions(i).size(), want[i].gpa, want[i].size));
  lanes_.clear();
  for (uint32_t i = 0; i <= h.config().vcpus(); ++i) lanes_.push_back(std::make_unique<Lane>());
  VmConfig config = h.config();
  if (absl::Status s = ApplyLocalSettings(config, local_); !s.ok()) return s;
  auto vm = Vm::CreateIncoming(config);
  if (!vm.ok())
    return absl::Status(vm.status().code(),
                        absl::StrCat("cannot build the incoming VM: ", vm.status().message()));
  absl::MutexLock lock(&mu_);
  vm_ = std::move(*vm);
  vm_raw_ = vm_.get();
  received_pages_ = std::make_unique<ReceivedPages>(vm_->memory());
  migration_id_ = h.migration_id();
  streams_ = h.page_streams();
  precopy_streams_ = streams_;
  received_.assign(streams_, 0);
  stream_state_.assign(streams_, 0);
  return absl::OkStatus();
}

grpc::Status MigrationDestination::Control(
    grpc::ServerContext* ctx, grpc::ServerReaderWriter<DestinationMessage, SourceMessage>* stream) {
  bool again;
  {
    absl::MutexLock lock(&mu_);
    again = started_;
    started_ = true;
  }
  if (again) {
    // The one migration may only come back to recover a broken post-copy.
    SourceMessage msg;
    if (!stream->Read(&msg) || !msg.has_recover())
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          "this VMM already has an incoming migration");
    absl::Status s = RunRecover(stream, msg.recover());
    if (!s.ok()) LOG_ERROR("post-copy recovery refused or failed: %s", s.message());
    return ToGrpcStatus(s);
  }
  absl::Status s = RunControl(ctx, stream);
  if (!s.ok()) {
    LOG_ERROR("incoming migration failed: %s", s.message());
    {
      // Discard: no page is accepted any more and the VM never runs. The VM object itself lives
      // until this service is destroyed, since a page stream may still be writing into it.
      absl::MutexLock lock(&mu_);
      migration_id_.clear();
    }
    Finish(s);
    return ToGrpcStatus(s);
  }
  return grpc::Status::OK;
}

absl::Status MigrationDestination::RunControl(
    grpc::ServerContext* ctx, grpc::ServerReaderWriter<DestinationMessage, SourceMessage>* stream) {
  SourceMessage msg;
  if (!stream->Read(&msg)) return absl::UnavailableError("source closed before the header");
  if (!msg.has_header()) return absl::InvalidArgumentError("first message is not a header");
  if (absl::Status s = AcceptHeader(msg.header()); !s.ok()) return s;
  LOG_INFO("incoming migration %s: %d MiB, %d vCPUs, %d page streams", msg.header().migration_id(),
           msg.header().config().memory_mib(), msg.header().config().vcpus(),
           msg.header().page_streams());
  {
    // Post-copy's memory layer is built now, outside any downtime (it registers nothing until
    // Start()); a host that cannot do post-copy still takes pre-copy migrations.
    Vm* v;
    {
      absl::MutexLock lock(&mu_);
      v = vm_.get();
    }
    PostcopyOptions opts;
    opts.lanes = static_cast<int>(lanes_.size()) - 1;
    auto pc = PostcopyMemory::Create(
        &v->memory(), opts, [this](int lane, uint64_t gpa) { FetchOnLane(lane, gpa); },
        [v](pid_t tid) {
          std::vector<pid_t> tids = v->VcpuThreadIds();
          for (size_t i = 0; i < tids.size(); ++i)
            if (tids[i] == tid) return static_cast<int>(i);
          return kVmmLane;
        });
    if (pc.ok())
      prepared_postcopy_ = std::move(*pc);
    else
      prepared_error_ = pc.status();
    kvm_userfault_.reset();
    if (prepared_postcopy_ != nullptr && v->KvmUserfaultAvailable()) {
      auto bm = std::make_unique<KvmUserfaultBitmap>();
      absl::Status s;
      const auto& regions = v->memory().regions();
      for (size_t i = 0; i < regions.size() && s.ok(); ++i)
        s = bm->AddSlot(Vm::RamSlot(i), regions[i].gpa, regions[i].size).status();
      if (s.ok()) {
        kvm_userfault_ = std::move(bm);
        prepared_postcopy_->AttachKvmUserfault(kvm_userfault_.get());
      } else {
        LOG_WARN("KVM Userfault bitmaps: %s; post-copy faults go through userfaultfd",
                 s.ToString());
      }
    }
  }
  DestinationMessage reply;
  reply.mutable_accepted()->set_flush(true);
  reply.mutable_accepted()->set_device_data(true);
  if (!stream->Write(reply)) return absl::UnavailableError("source went away after the header");

  if (!stream->Read(&msg)) return absl::UnavailableError("source disconnected during pre-copy");
  // Pre-copy: barriers (one per pass) and passthrough devices' pre-copy data.
  while (msg.has_flush() || msg.has_device_data()) {
    if (msg.has_device_data()) {
      if (absl::Status s = AddDeviceData(msg.device_data()); !s.ok()) return s;
    } else {
      if (absl::Status s = WaitStreamsReached(msg.flush().pages_per_stream(), ctx); !s.ok())
        return s;
      reply.Clear();
      reply.mutable_flushed();
      if (!stream->Write(reply))
        return absl::UnavailableError("source went away during pre-copy");
    }
    if (!stream->Read(&msg)) return absl::UnavailableError("source disconnected during pre-copy");
  }
  if (msg.has_abort())
    return absl::AbortedError(absl::StrCat("source aborted: ", msg.abort().reason()));
  Vm* vm;
  {
    absl::MutexLock lock(&mu_);
    vm = vm_.get();
  }
  if (msg.has_start_postcopy()) return RunPostcopy(stream, msg.start_postcopy(), vm);
  prepared_postcopy_.reset();  // a pre-copy switchover: not needed
  if (!msg.has_complete()) return absl::InvalidArgumentError("expected Complete");
  const Complete& c = msg.complete();
  if (absl::Status s = WaitStreamsClosed(0, c.pages_per_stream()); !s.ok()) return s;
  if (absl::Status s = RestoreMigratedState(vm, c.state()); !s.ok()) return s;
  reply.Clear();
  reply.mutable_ready();
  if (!stream->Write(reply)) return absl::UnavailableError("source went away before Go");
  if (!stream->Read(&msg)) return absl::UnavailableError("source disconnected before Go");
  if (!msg.has_go()) return absl::AbortedError("source did not send Go");
  if (absl::Status s = vm->Boot(); !s.ok()) return s;
  int64_t resumed = absl::ToUnixNanos(absl::Now());
  LOG_INFO("incoming migration complete: VM running");
  reply.Clear();
  reply.mutable_resumed()->set_resume_unix_ns(resumed);
  stream->Write(reply);  // best effort: the VM runs here now either way
  std::unique_ptr<Vm> running;
  {
    absl::MutexLock lock(&mu_);
    running = std::move(vm_);
    migration_id_.clear();
  }
  Finish(std::move(running));
  (void)ctx;
  return absl::OkStatus();
}

absl::Status MigrationDestination::AddDeviceData(const DeviceData& d) {
  if (d.slot() == 0 || d.slot() >= 32)
    return absl::InvalidArgumentError(absl::StrFormat("device data for PCI slot %d", d.slot()));
  if (d.data().size() > kMaxDeviceDataChunk)
    return absl::InvalidArgumentError(absl::StrFormat(
        "device data chunk of %d bytes (at most %d)", d.data().size(), kMaxDeviceDataChunk));
  std::string& have = device_data_[d.slot()];
  if (d.offset() != have.size())
    return absl::InvalidArgumentError(absl::StrFormat(
        "device data for slot %d at offset %d, %d bytes arrived before it", d.slot(), d.offset(),
        have.size()));
  device_data_bytes_ += d.data().size();
  if (device_data_bytes_ > kMaxDeviceData)
    return absl::ResourceExhaustedError(absl::StrFormat(
        "more than %d MiB of device pre-copy data", kMaxDeviceData >> 20));
  have += d.data();
  return absl::OkStatus();
}

absl::Status MigrationDestination::RestoreMigratedState(Vm* vm, VmState state) {
  // Each device's pre-copy data goes in front of the rest of its stream.
  for (VfioDeviceState& d : *state.mutable_vfio_devices()) {
    auto it = device_data_.find(d.slot());
    const uint64_t have = it == device_data_.end() ? 0 : it->second.size();
    if (d.blob_offset() != have)
      return absl::DataLossError(absl::StrFormat(
          "the %s device at slot %d continues its migration stream at byte %d, but %d bytes of "
          "it arrived before", d.kind(), d.slot(), d.blob_offset(), have));
    if (it == device_data_.end()) continue;
    d.mutable_pci()->set_device_blob(it->second + d.pci().device_blob());
    d.set_blob_offset(0);
    device_data_.erase(it);
  }
  for (const auto& [slot, data] : device_data_)  // what is left belongs to no device
    if (!data.empty())
      return absl::InvalidArgumentError(absl::StrFormat(
          "device pre-copy data arrived for PCI slot %d, which has no device in the VM state",
          slot));
  device_data_.clear();
  device_data_bytes_ = 0;
  return vm->RestoreState(state);
}

absl::Status MigrationDestination::WaitStreamsReached(
    const google::protobuf::RepeatedField<uint64_t>& counts, grpc::ServerContext* ctx) {
  absl::MutexLock lock(&mu_);
  if (static_cast<uint32_t>(counts.size()) != precopy_streams_)
    return absl::InvalidArgumentError(absl::StrFormat(
        "flush names %d page streams, the migration has %d", counts.size(), precopy_streams_));
  // Done when every stream delivered its count, or one failed, or one ended short of it (the
  // source closed it: nothing more can come on it).
  auto settled = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!page_error_.empty()) return true;
    for (uint32_t i = 0; i < precopy_streams_; ++i)
      if (received_[i] < counts.Get(i) && stream_state_[i] != 2) return false;
    return true;
  };
  // The source flushes what it has handed to its streams; those bytes are at most a few
  // socket buffers away. A stream that stops delivering for this long has failed; a source
  // that went away (the control call ends) is noticed within a second.
  const absl::Time deadline = absl::Now() + kFlushTimeout;
  while (!mu_.AwaitWithTimeout(absl::Condition(&settled), absl::Seconds(1))) {
    if (ctx != nullptr && ctx->IsCancelled())
      return absl::CancelledError("the source went away during pre-copy");
    if (absl::Now() >= deadline) {
      std::string got;
      for (uint32_t i = 0; i < precopy_streams_; ++i)
        absl::StrAppendFormat(&got, "%s%d/%d", i ? ", " : "", received_[i], counts.Get(i));
      return absl::DeadlineExceededError(absl::StrFormat(
          "page streams did not deliver the flushed pages within %d s (received/flushed: %s)",
          absl::ToInt64Seconds(kFlushTimeout), got));
    }
  }
  if (!page_error_.empty()) return absl::InvalidArgumentError(page_error_);
  for (uint32_t i = 0; i < precopy_streams_; ++i)
    if (received_[i] < counts.Get(i))
      return absl::DataLossError(absl::StrFormat(
          "page stream %d ended after %d pages, the source flushed %d", i, received_[i],
          counts.Get(i)));
  return absl::OkStatus();
}

absl::Status MigrationDestination::WaitStreamsClosed(
    uint32_t first, const google::protobuf::RepeatedField<uint64_t>& counts) {
  absl::MutexLock lock(&mu_);
  if (first + static_cast<uint32_t>(counts.size()) != streams_)
    return absl::InvalidArgumentError("wrong number of page stream counts");
  // Every page stream must have been closed by the source with exactly the promised pages.
  auto all_closed = [this, first]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!page_error_.empty()) return true;
    for (uint32_t i = first; i < streams_; ++i)
      if (stream_state_[i] != 2) return false;
    return pages_in_progress_ == 0;
  };
  if (!mu_.AwaitWithTimeout(absl::Condition(&all_closed), absl::Seconds(30)))
    return absl::DeadlineExceededError("page streams did not finish");
  if (!page_error_.empty()) return absl::InvalidArgumentError(page_error_);
  for (uint32_t i = first; i < streams_; ++i)
    if (received_[i] != counts.Get(i - first))
      return absl::DataLossError(absl::StrFormat("stream %d: received %d pages, source sent %d",
                                                 i, received_[i], counts.Get(i - first)));
  return absl::OkStatus();
}

namespace {

// A post-copy page (pushed or answered on a lane) into `pc`: validated like DecodePageInto.
absl::Status InstallRecord(const PageRecord& rec, const GuestMemory& mem, PostcopyMemory& pc) {
  if (rec.gpa() % kPageSize != 0 || !mem.Contains(rec.gpa(), kPageSize))
    return absl::InvalidArgumentError(absl::StrFormat("page 0x%x outside guest RAM", rec.gpa()));
  absl::StatusOr<bool> r;
  if (rec.codec() == RAW && rec.data().size() == kPageSize) {
    r = pc.Install(rec.gpa(), std::span<const uint8_t>(
                                  reinterpret_cast<const uint8_t*>(rec.data().data()), kPageSize));
  } else if (rec.codec() == ZERO && rec.data().empty()) {
    r = pc.InstallZero(rec.gpa());
  } else {
    return absl::InvalidArgumentError(
        absl::StrFormat("page 0x%x: bad codec %d / length %d", rec.gpa(), rec.codec(),
                        rec.data().size()));
  }
  return r.status();
}

}  // namespace

grpc::Status MigrationDestination::Pages(grpc::ServerContext* ctx,
                                         grpc::ServerReader<PageBatch>* reader,
                                         PagesSummary* summary) {
  (void)ctx;
  int stream = -1;
  uint32_t streams = 0;
  bool push = false;  // a post-copy push stream
  uint64_t pages = 0, bytes = 0;
  GuestMemory* mem = nullptr;
  {
    absl::MutexLock lock(&mu_);
    ++pages_in_progress_;
  }
  // Ends this stream: records the first error (Control reports it) and marks the stream closed.
  auto end = [&](absl::Status s) {
    absl::MutexLock lock(&mu_);
    // Only a stream of the running migration can spoil it; a stray call is just refused.
    // Push streams of a connection set that broke before a recovery cannot spoil it.
    const bool current = stream >= 0 && (static_cast<uint32_t>(stream) < precopy_streams_ ||
                                         static_cast<uint32_t>(stream) >= push_first_);
    if (!s.ok() && current && page_error_.empty()) page_error_ = std::string(s.message());
    if (stream >= 0 && static_cast<size_t>(stream) < stream_state_.size()) stream_state_[stream] = 2;
    --pages_in_progress_;
    return s;
  };
  // Checks that `batch` belongs to the running migration and (first batch) claims its stream.
  auto check = [&](const PageBatch& batch) -> absl::Status {
    absl::MutexLock lock(&mu_);
    if (migration_id_.empty() || vm_raw_ == nullptr || batch.migration_id() != migration_id_)
      return absl::FailedPreconditionError("page batch for an unknown or finished migration");
    if (stream < 0) {
      if (batch.stream() >= streams_ || stream_state_[batch.stream()] != 0)
        return absl::InvalidArgumentError(
            absl::StrFormat("bad or duplicate page stream index %d", batch.stream()));
      stream = batch.stream();
      stream_state_[stream] = 1;
      streams = precopy_streams_;
      push = batch.stream() >= precopy_streams_;
      mem = &vm_raw_->memory();
    } else if (batch.stream() != static_cast<uint32_t>(stream)) {
      return absl::InvalidArgumentError("page stream index changed mid-stream");
    }
    return absl::OkStatus();
  };
  PageBatch batch;
  while (reader->Read(&batch)) {
    if (absl::Status s = check(batch); !s.ok()) return ToGrpcStatus(end(s));
    for (const PageRecord& rec : batch.pages()) {
      if (push) {
        if (absl::Status s = InstallRecord(rec, *mem, *postcopy_); !s.ok())
          return ToGrpcStatus(end(s));
        ++pages;
        bytes += rec.data().size();
        continue;
      }
      if (StreamForPage(rec.gpa(), streams) != static_cast<uint32_t>(stream))
        return ToGrpcStatus(end(absl::InvalidArgumentError(absl::StrFormat(
            "page 0x%x arrived on stream %d, which does not carry it", rec.gpa(), stream))));
      if (absl::Status s = DecodePageInto(rec, *mem, received_pages_.get()); !s.ok())
        return ToGrpcStatus(end(s));
      ++pages;
      bytes += rec.data().size();
    }
    absl::MutexLock lock(&mu_);
    if (stream >= 0) received_[stream] = pages;
  }
  summary->set_pages(pages);
  summary->set_bytes(bytes);
  (void)end(absl::OkStatus());
  return grpc::Status::OK;
}

// ---- Post-copy --------------------------------------------------------------------------------

namespace {

absl::StatusOr<std::vector<std::vector<uint64_t>>> DecodeBitmaps(
    const google::protobuf::RepeatedPtrField<std::string>& in, const GuestMemory& mem,
    const char* what) {
  std::vector<std::vector<uint64_t>> out;
  if (in.empty()) return out;  // "no page"
  if (static_cast<size_t>(in.size()) != mem.regions().size())
    return absl::InvalidArgumentError(absl::StrFormat("%s map: %d regions, expected %d", what,
                                                      in.size(), mem.regions().size()));
  for (size_t i = 0; i < mem.regions().size(); ++i) {
    size_t words = (mem.regions()[i].size / kPageSize + 63) / 64;
    const std::string& b = in.Get(static_cast<int>(i));
    if (b.size() != words * 8)
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s map of region %d: %d bytes, expected %d", what, i, b.size(), words * 8));
    std::vector<uint64_t> w(words);
    std::memcpy(w.data(), b.data(), b.size());
    out.push_back(std::move(w));
  }
  return out;
}

}  // namespace

void MigrationDestination::FetchOnLane(int lane, uint64_t gpa) {
  size_t i = lane < 0 || static_cast<size_t>(lane) >= lanes_.size() - 1 ? lanes_.size() - 1
                                                                          : static_cast<size_t>(lane);
  Lane& l = *lanes_[i];
  absl::MutexLock lock(&l.mu);
  if (l.stream == nullptr) {
    l.pending.push_back(gpa);  // sent when the lane opens (or re-requested after a recovery)
    return;
  }
  PageRequest req;
  req.add_gpas(gpa);
  if (!l.stream->Write(req)) l.pending.push_back(gpa);  // the lane's handler notices the loss
}

grpc::Status MigrationDestination::Demand(
    grpc::ServerContext* ctx, grpc::ServerReaderWriter<PageRequest, PageBatch>* stream) {
  (void)ctx;
  PageBatch batch;
  if (!stream->Read(&batch)) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no hello");
  Lane* lane = nullptr;
  GuestMemory* mem = nullptr;
  {
    absl::MutexLock lock(&mu_);
    if (migration_id_.empty() || vm_raw_ == nullptr || batch.migration_id() != migration_id_)
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          "demand lane for an unknown or finished migration");
    if (batch.stream() >= lanes_.size())
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          absl::StrFormat("bad demand lane %d", batch.stream()));
    lane = lanes_[batch.stream()].get();
    mem = &vm_raw_->memory();
  }
  uint64_t generation;
  {
    absl::MutexLock lock(&lane->mu);
    if (lane->seen)
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "demand lane opened twice");
    lane->seen = true;
    generation = generation_.load();
    lane->stream = stream;
    if (!lane->pending.empty()) {
      PageRequest req;
      for (uint64_t gpa : lane->pending) req.add_gpas(gpa);
      lane->pending.clear();
      stream->Write(req);
    }
  }
  absl::Status status;
  const std::string id = batch.migration_id();
  const uint32_t lane_index = batch.stream();
  while (stream->Read(&batch)) {
    if (postcopy_ == nullptr) {
      status = absl::FailedPreconditionError("page answer before post-copy started");
      break;
    }
    // Every answer names the lane's migration and index, as the hello did (like page streams).
    if (batch.migration_id() != id || batch.stream() != lane_index) {
      status = absl::InvalidArgumentError(absl::StrFormat(
          "demand lane %d: answer for migration '%s' lane %d", lane_index,
          batch.migration_id().substr(0, 64), batch.stream()));
      break;
    }
    for (const PageRecord& rec : batch.pages()) {
      status = InstallRecord(rec, *mem, *postcopy_);
      if (!status.ok()) break;
    }
    if (!status.ok()) break;
  }
  {
    absl::MutexLock lock(&lane->mu);
    if (lane->stream == stream) lane->stream = nullptr;  // else a recovery reopened the lane
  }
  if (generation == generation_.load() && postcopy_ != nullptr && !postcopy_->complete()) {
    FailPostcopy(status.ok() ? absl::UnavailableError(absl::StrFormat(
                                   "demand lane %d to the source was lost", lane_index))
                             : status);
  }
  return ToGrpcStatus(status);
}

PostcopyStats MigrationDestination::PostcopyStatsNow() const {
  PostcopyStats out;
  if (postcopy_ == nullptr) return out;
  PostcopyMemory::Stats s = postcopy_->stats();
  out.set_missing_pages(postcopy_->missing_pages());
  out.set_pulled(s.pulled);
  out.set_pushed(s.pushed);
  out.set_duplicates(s.duplicates);
  out.set_fault_path(kvm_userfault_ != nullptr ? "kvm-userfault" : "userfaultfd");
  auto put = [&](int lane, const PostcopyMemory::LaneStats& l) {
    LaneStats* x = out.add_lanes();
    x->set_lane(lane);
    x->set_faults(l.faults);
    x->set_p50_us(l.p50_us);
    x->set_p99_us(l.p99_us);
    x->set_blocked_ms(l.blocked_ms);
  };
  for (size_t i = 0; i < s.lanes.size(); ++i) put(static_cast<int>(i), s.lanes[i]);
  put(kVmmLane, s.vmm);
  return out;
}

void MigrationDestination::FailPostcopy(const absl::Status& why) {
  {
    // Before Go the guest does not run yet: the failure is applied once it does (below Go in
    // RunPostcopy), so e.g. a lane broken early never leaves a running guest without its lane.
    absl::MutexLock lock(&early_mu_);
    if (!postcopy_running_.load()) {
      if (early_failure_.ok()) early_failure_ = why;
      return;
    }
  }
  if (postcopy_failed_.exchange(true)) return;
  postcopy_->Suspend();
  std::string note = absl::StrCat(
      "post-copy migration failed with ", postcopy_->missing_pages(),
      " pages still at the source: ", why.message(),
      "; the guest is paused (its missing pages are never zero-filled)");
  LOG_ERROR("%s", note);
  Vm* vm = postcopy_vm_;
  if (vm == nullptr) return;
  vm->SetMigrationNote(note);
  // Pausing kicks vCPUs out of KVM_RUN; one waiting on a missing page leaves its fault when
  // signalled. Done off this gRPC thread so the service never blocks on it.
  failure_pause_done_ = false;
  std::thread([this, vm] {
    if (vm->state() == RunState::kRunning && vm->Pause().ok()) paused_by_failure_ = true;
    failure_pause_done_ = true;
  }).detach();
}

absl::Status MigrationDestination::RunPostcopy(
    grpc::ServerReaderWriter<DestinationMessage, SourceMessage>* stream, const StartPostcopy& sp,
    Vm* vm) {
  if (absl::Status s = WaitStreamsClosed(0, sp.pages_per_stream()); !s.ok()) return s;
  if (sp.lanes() != lanes_.size())
    return absl::InvalidArgumentError(
        absl::StrFormat("%d demand lanes announced, expected %d", sp.lanes(), lanes_.size()));
  if (sp.push_streams() == 0 || sp.push_streams() > kMaxPageStreams)
    return absl::InvalidArgumentError("bad number of push streams");
  GuestMemory& mem = vm->memory();
  auto present = DecodeBitmaps(sp.present(), mem, "present");
  if (!present.ok()) return present.status();
  auto zero = DecodeBitmaps(sp.zero(), mem, "zero");
  if (!zero.ok()) return zero.status();

  if (prepared_postcopy_ == nullptr)
    return absl::Status(prepared_error_.code(),
                        absl::StrCat("post-copy unavailable here: ", prepared_error_.message()));
  postcopy_ = std::move(prepared_postcopy_);
  postcopy_vm_ = vm;
  // Stale and missing pages are dropped and guarded before anything (state restore included)
  // can touch guest memory.
  if (absl::Status s = postcopy_->Start(*present, *zero); !s.ok()) return s;
  // A vCPU waiting for a missing page runs no guest code; pausing must not signal it again and
  // again (on some KVMs a signal during the fault makes it retry in a loop).
  {
    PostcopyMemory* pc = postcopy_.get();
    vm->SetVcpuWaitingProbe([pc](int vcpu) { return pc->LaneWaiting(vcpu); });
  }
  if (kvm_userfault_ != nullptr) {
    // Exit-driven path: a vCPU touching a missing page exits to its own thread, which fetches the
    // page on its own lane (no fault reader in between) and re-enters.
    PostcopyMemory* pc = postcopy_.get();
    absl::Status s = vm->SetMemoryFaultHandler(
        [pc, vm](int vcpu, uint64_t gpa, uint64_t size, uint64_t flags) -> absl::Status {
          if (!(flags & KVM_MEMORY_EXIT_FLAG_USERFAULT))
            return absl::InternalError(absl::StrFormat(
                "vCPU %d: memory fault exit at gpa 0x%x without the userfault flag (flags 0x%x)",
                vcpu, gpa, flags));
          return pc->ResolveVcpuExit(vcpu, gpa, size,
                                     [vm] { return vm->state() == RunState::kExited; });
        });
    std::vector<const void*> bitmaps;
    for (size_t i = 0; i < mem.regions().size(); ++i)
      bitmaps.push_back(kvm_userfault_->SlotBitmap(Vm::RamSlot(i)));
    if (s.ok()) s = vm->SetRamUserfault(bitmaps);
    if (!s.ok()) return s;
  }
  {
    absl::MutexLock lock(&mu_);
    streams_ = precopy_streams_ + sp.push_streams();
    push_first_ = precopy_streams_;
    received_.resize(streams_, 0);
    stream_state_.resize(streams_, 0);
  }
  if (absl::Status s = RestoreMigratedState(vm, sp.state()); !s.ok()) return s;
  if (vm->passthrough_devices() > 0) {
    // Passthrough devices DMA only into pages that are here (their doorbells wait for them).
    PostcopyMemory* pc = postcopy_.get();
    if (absl::Status s = vm->SetPassthroughPostcopy([pc](uint64_t gpa, uint64_t len) {
          return pc->EnsurePresent(gpa, len, absl::Seconds(5));
        });
        !s.ok())
      return s;
  }
  LOG_INFO("incoming migration: post-copy switchover, %d pages missing (%s mode)",
           postcopy_->missing_pages(),
           postcopy_->mode() == PostcopyOptions::Mode::kMinor ? "MINOR" : "MISSING");
  DestinationMessage reply;
  reply.mutable_ready();
  if (!stream->Write(reply)) return absl::UnavailableError("source went away before Go");
  SourceMessage msg;
  if (!stream->Read(&msg)) return absl::UnavailableError("source disconnected before Go");
  if (!msg.has_go()) return absl::AbortedError("source did not send Go");
  absl::Status early;
  {
    absl::MutexLock lock(&early_mu_);
    postcopy_running_ = true;
    early = early_failure_;
  }
  if (absl::Status s = vm->Boot(); !s.ok()) return s;
  reply.Clear();
  reply.mutable_resumed()->set_resume_unix_ns(absl::ToUnixNanos(absl::Now()));
  stream->Write(reply);
  LOG_INFO("incoming migration: VM running here, pages arrive on demand and by push");
  {
    std::unique_ptr<Vm> running;
    {
      absl::MutexLock lock(&mu_);
      running = std::move(vm_);
    }
    Finish(std::move(running));  // the VMM adopts the running VM now
  }
  if (!early.ok()) FailPostcopy(early);  // something failed before Go
  ServePostcopy(stream, precopy_streams_);
  return absl::OkStatus();  // a failure is reported on the VM (which was handed over)
}

void MigrationDestination::ServePostcopy(
    grpc::ServerReaderWriter<DestinationMessage, SourceMessage>* stream, uint32_t first_push) {
  absl::Mutex write_mu;  // Control writes: this thread and the stats reporter
  SourceMessage msg;
  DestinationMessage reply;
  // Progress for the source's WatchMigration.
  std::atomic<bool> stop_stats{false};
  std::thread reporter([&] {
    while (!stop_stats.load()) {
      for (int i = 0; i < 10 && !stop_stats.load(); ++i) absl::SleepFor(absl::Milliseconds(50));
      DestinationMessage m;
      *m.mutable_postcopy_stats() = PostcopyStatsNow();
      absl::MutexLock lock(&write_mu);
      if (!stream->Write(m)) break;
    }
  });
  absl::Status result;
  if (!stream->Read(&msg) || !msg.has_postcopy_complete()) {
    result = absl::UnavailableError("the source went away before it pushed every page");
  } else if (absl::Status s = WaitStreamsClosed(first_push,
                                                msg.postcopy_complete().pages_per_stream());
             !s.ok()) {
    result = s;
  } else {
    // Every page was pushed; answers to demand requests may still be on their lanes. Pages
    // still known-zero need nothing more.
    postcopy_->SettleZeroPages();
    absl::Time deadline = absl::Now() + absl::Seconds(30);
    while (!postcopy_->complete() && absl::Now() < deadline && !postcopy_failed_.load())
      absl::SleepFor(absl::Milliseconds(5));
    if (!postcopy_->complete())
      result = absl::DataLossError(absl::StrFormat(
          "%d pages still missing after the source pushed everything", postcopy_->missing_pages()));
    else
      result = postcopy_->Finish();
    // Every page is here: memslots without KVM_MEM_USERFAULT again (the bitmap must outlive
    // that), so vCPUs stop checking it.
    if (result.ok() && kvm_userfault_ != nullptr) result = postcopy_vm_->SetRamUserfault({});
    if (result.ok()) postcopy_vm_->SetVcpuWaitingProbe({});
    if (result.ok()) (void)postcopy_vm_->SetPassthroughPostcopy(nullptr);  // doorbells go direct
  }
  stop_stats = true;
  reporter.join();
  if (!result.ok()) {
    FailPostcopy(result);
    absl::MutexLock lock(&mu_);
    // From now on the source may come back with Recover (one recovery at a time).
    recover_id_ = migration_id_;
    migration_id_.clear();
    recovering_ = false;
    return;
  }
  postcopy_running_ = false;
  reply.Clear();
  *reply.mutable_postcopy_done()->mutable_stats() = PostcopyStatsNow();
  stream->Write(reply);
  {
    absl::MutexLock lock(&mu_);
    migration_id_.clear();
    recovering_ = false;
  }
  LOG_INFO("incoming migration: post-copy complete, every page present");
}

absl::Status MigrationDestination::RunRecover(
    grpc::ServerReaderWriter<DestinationMessage, SourceMessage>* stream, const Recover& r) {
  if (r.push_streams() == 0 || r.push_streams() > kMaxPageStreams)
    return absl::InvalidArgumentError("bad number of push streams");
  uint32_t first;
  {
    absl::MutexLock lock(&mu_);
    if (postcopy_ == nullptr || postcopy_vm_ == nullptr || recovering_ || recover_id_.empty() ||
        r.migration_id() != recover_id_)
      return absl::FailedPreconditionError(
          "no broken post-copy migration with this id waits for recovery here");
    // Bounded: every recovery adds streams, a misbehaving source cannot grow this forever.
    if (streams_ + r.push_streams() > 64 * kMaxPageStreams)
      return absl::ResourceExhaustedError("too many post-copy recoveries");
    recovering_ = true;
    recover_id_.clear();
    migration_id_ = r.migration_id();  // lanes and push streams of this id are accepted again
    page_error_.clear();
    first = streams_;
    push_first_ = first;
    streams_ += r.push_streams();
    received_.resize(streams_, 0);
    stream_state_.resize(streams_, 0);
  }
  generation_.fetch_add(1);
  for (auto& l : lanes_) {
    absl::MutexLock lock(&l->mu);
    l->seen = false;
  }
  auto abandon = [&](absl::Status why) {
    absl::MutexLock lock(&mu_);
    recover_id_ = r.migration_id();
    migration_id_.clear();
    recovering_ = false;
    return why;
  };
  // What the destination has now. In-flight pages are not present: Refetch asks for them again
  // and the source pushes them too (their answer may have been lost with the old connection).
  const PageStateMap& states = postcopy_->page_states();
  const GuestMemory& mem = postcopy_vm_->memory();
  DestinationMessage reply;
  RecoverState* rs = reply.mutable_recover_state();
  rs->set_first_push_stream(first);
  uint64_t present_pages = 0;
  for (size_t i = 0; i < mem.regions().size(); ++i) {
    uint64_t pages = mem.regions()[i].size / kPageSize;
    std::vector<uint64_t> words((pages + 63) / 64);
    for (uint64_t p = 0; p < pages; ++p) {
      PageState st = states.Get(states.FirstPage(i) + p);
      if (st == PageState::kPresent || st == PageState::kInstalling) {
        words[p / 64] |= 1ULL << (p % 64);
        ++present_pages;
      }
    }
    rs->add_present(std::string(reinterpret_cast<const char*>(words.data()), words.size() * 8));
  }
  LOG_INFO("incoming migration %s: post-copy recovery, %d pages present, %d missing",
           r.migration_id(), present_pages, postcopy_->missing_pages());
  if (!stream->Write(reply)) return abandon(absl::UnavailableError("source went away"));
  SourceMessage msg;
  if (!stream->Read(&msg) || !msg.has_go())
    return abandon(absl::UnavailableError("source did not send Go for the recovery"));
  postcopy_failed_ = false;
  postcopy_->Refetch();
  Vm* vm = postcopy_vm_;
  vm->SetMigrationNote("");
  // The failure's pause may itself wait for a thread that needs a page (arriving now).
  for (absl::Time end = absl::Now() + absl::Seconds(30);
       !failure_pause_done_.load() && absl::Now() < end;)
    absl::SleepFor(absl::Milliseconds(5));
  if (paused_by_failure_.exchange(false) && vm->state() == RunState::kPaused) {
    if (absl::Status s = vm->Resume(); !s.ok())
      LOG_ERROR("post-copy recovery: cannot resume the guest: %s", s.message());
  }
  reply.Clear();
  reply.mutable_resumed()->set_resume_unix_ns(absl::ToUnixNanos(absl::Now()));
  stream->Write(reply);
  LOG_INFO("incoming migration %s: post-copy recovered, guest running again", r.migration_id());
  ServePostcopy(stream, first);
  return absl::OkStatus();
}

}  // namespace microvmm::migration
