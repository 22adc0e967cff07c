#include "migration/precopy/destination.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "api/listen.h"
#include "migration/stream/page_codec.h"
#include "vmm/base/log.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::migration {

MigrationDestination::MigrationDestination(VmConfig local, DoneFn done)
    : local_(std::move(local)), done_(std::move(done)) {}

MigrationDestination::~MigrationDestination() = default;

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
  VmConfig config = h.config();
  if (absl::Status s = ApplyLocalSettings(config, local_); !s.ok()) return s;
  auto vm = Vm::CreateIncoming(config);
  if (!vm.ok())
    return absl::Status(vm.status().code(),
                        absl::StrCat("cannot build the incoming VM: ", vm.status().message()));
  absl::MutexLock lock(&mu_);
  vm_ = std::move(*vm);
  received_pages_ = std::make_unique<ReceivedPages>(vm_->memory());
  migration_id_ = h.migration_id();
  streams_ = h.page_streams();
  received_.assign(streams_, 0);
  stream_state_.assign(streams_, 0);
  return absl::OkStatus();
}

grpc::Status MigrationDestination::Control(
    grpc::ServerContext* ctx, grpc::ServerReaderWriter<DestinationMessage, SourceMessage>* stream) {
  {
    absl::MutexLock lock(&mu_);
    if (started_)
      return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                          "this VMM already has an incoming migration");
    started_ = true;
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
  DestinationMessage reply;
  reply.mutable_accepted();
  if (!stream->Write(reply)) return absl::UnavailableError("source went away after the header");

  if (!stream->Read(&msg)) return absl::UnavailableError("source disconnected during pre-copy");
  if (msg.has_abort())
    return absl::AbortedError(absl::StrCat("source aborted: ", msg.abort().reason()));
  if (!msg.has_complete()) return absl::InvalidArgumentError("expected Complete");
  const Complete& c = msg.complete();
  {
    absl::MutexLock lock(&mu_);
    if (static_cast<uint32_t>(c.pages_per_stream_size()) != streams_)
      return absl::InvalidArgumentError("Complete has the wrong number of stream counts");
    // Every page stream must have been closed by the source with exactly the promised pages.
    auto all_closed = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      if (!page_error_.empty()) return true;
      for (int st : stream_state_)
        if (st != 2) return false;
      return pages_in_progress_ == 0;
    };
    if (!mu_.AwaitWithTimeout(absl::Condition(&all_closed), absl::Seconds(30)))
      return absl::DeadlineExceededError("page streams did not finish");
    if (!page_error_.empty()) return absl::InvalidArgumentError(page_error_);
    for (uint32_t i = 0; i < streams_; ++i)
      if (received_[i] != c.pages_per_stream(i))
        return absl::DataLossError(absl::StrFormat(
            "stream %d: received %d pages, source sent %d", i, received_[i], c.pages_per_stream(i)));
  }
  Vm* vm;
  {
    absl::MutexLock lock(&mu_);
    vm = vm_.get();
  }
  if (absl::Status s = vm->RestoreState(c.state()); !s.ok()) return s;
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

grpc::Status MigrationDestination::Pages(grpc::ServerContext* ctx,
                                         grpc::ServerReader<PageBatch>* reader,
                                         PagesSummary* summary) {
  (void)ctx;
  int stream = -1;
  uint32_t streams = 0;
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
    if (!s.ok() && stream >= 0 && page_error_.empty()) page_error_ = std::string(s.message());
    if (stream >= 0 && static_cast<size_t>(stream) < stream_state_.size()) stream_state_[stream] = 2;
    --pages_in_progress_;
    return s;
  };
  // Checks that `batch` belongs to the running migration and (first batch) claims its stream.
  auto check = [&](const PageBatch& batch) -> absl::Status {
    absl::MutexLock lock(&mu_);
    if (migration_id_.empty() || vm_ == nullptr || batch.migration_id() != migration_id_)
      return absl::FailedPreconditionError("page batch for an unknown or finished migration");
    if (stream < 0) {
      if (batch.stream() >= streams_ || stream_state_[batch.stream()] != 0)
        return absl::InvalidArgumentError(
            absl::StrFormat("bad or duplicate page stream index %d", batch.stream()));
      stream = batch.stream();
      stream_state_[stream] = 1;
      streams = streams_;
      mem = &vm_->memory();
    } else if (batch.stream() != static_cast<uint32_t>(stream)) {
      return absl::InvalidArgumentError("page stream index changed mid-stream");
    }
    return absl::OkStatus();
  };
  PageBatch batch;
  while (reader->Read(&batch)) {
    if (absl::Status s = check(batch); !s.ok()) return ToGrpcStatus(end(s));
    for (const PageRecord& rec : batch.pages()) {
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
  end(absl::OkStatus());
  return grpc::Status::OK;
}

}  // namespace microvmm::migration
