// virtio-balloon (virtio device ID 5; virtio spec "Memory Balloon Device").
//
// Features offered (fixed at creation from VirtioBalloonOptions):
//  - VIRTIO_BALLOON_F_STATS_VQ always: GetStats()/RequestStats(), optional periodic requests.
//  - VIRTIO_BALLOON_F_DEFLATE_ON_OOM if deflate_on_oom: only the bit. The guest then treats the
//    target as a hint and deflates by itself under memory pressure (it tells the device through
//    deflateq as usual); nothing else changes on the device side.
//  - VIRTIO_BALLOON_F_FREE_PAGE_HINT if free_page_hinting (see free_page_hints.h).
//  - VIRTIO_BALLOON_F_REPORTING if free_page_reporting: reported ranges are discarded.
//  - Not offered: MUST_TELL_HOST (deflated pages need no host action: a discarded page comes
//    back zero-filled on first touch) and PAGE_POISON (reported pages come back as zeros, not as
//    the guest's poison pattern; a Linux guest that poisons or zeroes freed pages then keeps
//    free page reporting off by itself).
//
// Queue numbering. The spec fixes the indices: 0 inflateq, 1 deflateq, 2 statsq, 3 free_page_vq,
// 4 reporting_vq, each of the last three existing only if its feature is negotiated — so there
// can be holes (e.g. 0, 1, 2, 4); current Linux follows that. Older Linux (before the 2024 fix
// "virtio: fix vq # when vq skipped") and QEMU number the existing queues contiguously instead
// (reporting_vq is 3 without free page hinting).
// queue_max_sizes() must not depend on negotiation, so the device exposes
// 1 + (highest spec index among the offered features) queues, which covers both numberings, and
// picks the numbering at Activate(): if the spec and the contiguous layout of the negotiated
// features differ, the layout that explains every queue the driver enabled wins (a driver
// enables exactly the queues it uses); spec numbering if both or neither do. Queues outside the
// chosen layout are ignored.
//
// Inflate/deflate: PFNs are 32-bit, 4 KiB pages. Inflated pages are discarded
// (GuestMemory::Discard: hole punched in the memfd, page marked dirty) and tracked in a bitmap;
// deflated pages are just dropped from it. PFNs outside guest RAM are ignored (rate-limited log).
//
// Threading: see device.h. Everything is synchronous under one mutex; queue signals and config
// notifications are raised with it held (allowed by the contract), the hint sink is called with it
// held. The stats timer runs on the EventLoop.
//
// Save/restore: balloon_state.proto. The stats buffer the device holds stays in flight in the
// statsq state and is held again by Activate() after RestoreState(). Inflated pages are not
// discarded again on restore (guest RAM may still be arriving, e.g. postcopy). A hinting session
// does not survive a restore (the sink is a source-side object): hints arriving afterwards are
// ignored; the migration code should FinishFreePageHinting() before the final save.
// Other chains found in flight after a restore (none in practice: every chain is completed within
// ProcessQueue) are completed again in Activate(); their used-buffer signal is sent at the next
// queue notification or stats timer tick (Activate() may not call back into the transport).
#ifndef MICROVMM_DEVICES_VIRTIO_BALLOON_BALLOON_H_
#define MICROVMM_DEVICES_VIRTIO_BALLOON_BALLOON_H_

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "devices/virtio/balloon/free_page_hints.h"
#include "devices/virtio/device.h"
#include "vmm/base/fd.h"
#include "vmm/event_loop.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::virtio {

// Feature bits (uapi linux/virtio_balloon.h).
inline constexpr int kBalloonFMustTellHost = 0;
inline constexpr int kBalloonFStatsVq = 1;
inline constexpr int kBalloonFDeflateOnOom = 2;
inline constexpr int kBalloonFFreePageHint = 3;
inline constexpr int kBalloonFPagePoison = 4;
inline constexpr int kBalloonFReporting = 5;

inline constexpr uint32_t kBalloonPfnShift = 12;  // VIRTIO_BALLOON_PFN_SHIFT
inline constexpr uint32_t kBalloonConfigSize = 16;  // struct virtio_balloon_config

// Statistics tags (VIRTIO_BALLOON_S_*; 10..15 are from Linux 6.12).
inline constexpr uint16_t kBalloonStatTags = 16;

struct VirtioBalloonOptions {
  uint64_t initial_target_bytes = 0;  // num_pages at creation (rounded down to 4 KiB pages)
  bool deflate_on_oom = false;
  bool free_page_reporting = false;
  bool free_page_hinting = false;
  uint32_t stats_interval_s = 0;  // periodic stats requests; 0 = only RequestStats()
};

// The guest's last memory statistics (each field present only if the guest sent that tag).
struct BalloonStats {
  std::optional<uint64_t> swap_in, swap_out;             // bytes (tags 0, 1)
  std::optional<uint64_t> major_faults, minor_faults;    // counts (2, 3)
  std::optional<uint64_t> free_memory, total_memory;     // bytes (4, 5)
  std::optional<uint64_t> available_memory, disk_caches;  // bytes (6, 7)
  std::optional<uint64_t> hugetlb_allocations, hugetlb_failures;  // counts (8, 9)
  std::optional<uint64_t> oom_kills, alloc_stalls;                // counts (10, 11)
  std::optional<uint64_t> async_scans, direct_scans;              // pages (12, 13)
  std::optional<uint64_t> async_reclaims, direct_reclaims;        // pages (14, 15)
  absl::Time timestamp;  // when the device received them
};

class VirtioBalloon : public VirtioDevice {
 public:
  static constexpr uint32_t kQueueSize = 256;
  // Queue roles, which are also the spec's queue indices.
  enum Role : uint8_t { kInflate = 0, kDeflate, kStats, kFreePage, kReporting, kNumRoles };

  // `mem` (and `loop`, if given) must outlive the device. `loop` is required when
  // options.stats_interval_s > 0 (the timerfd is registered there).
  static absl::StatusOr<std::unique_ptr<VirtioBalloon>> Create(GuestMemory* mem, EventLoop* loop,
                                                               const VirtioBalloonOptions& options);
  ~VirtioBalloon() override;

  // --- VirtioDevice ---
  uint16_t device_type() const override { return kDeviceIdBalloon; }
  std::string name() const override { return "balloon"; }
  uint64_t device_features() const override { return features_; }
  std::vector<uint32_t> queue_max_sizes() const override;
  uint32_t config_size() const override { return kBalloonConfigSize; }
  void ReadConfig(uint64_t offset, std::span<uint8_t> data) override;
  void WriteConfig(uint64_t offset, std::span<const uint8_t> data) override;
  absl::Status Activate(uint64_t features, std::span<Virtqueue* const> queues,
                        QueueSignal signal) override;
  void Reset() override;
  void ProcessQueue(uint16_t index) override;
  void Quiesce() override;
  std::string SaveState() const override;
  absl::Status RestoreState(const std::string& state) override;

  // --- Host control ---
  // Sets the target balloon size (num_pages = bytes / 4 KiB, capped at 2^32 - 1) and raises a
  // config-change interrupt. Not from inside Activate/Reset/Save/Restore.
  void SetTarget(uint64_t bytes);
  uint64_t target_bytes() const;
  uint64_t actual_bytes() const;    // what the guest reports in `actual`
  uint64_t inflated_pages() const;  // what the device tracked through inflateq/deflateq
  bool IsInflated(uint64_t gpa) const;

  // Returns the held stats buffer to the guest, which answers with fresh statistics. False if
  // the device holds no buffer (stats not negotiated, not active, or the guest has not refilled
  // it yet). While quiesced, the request is remembered and sent at the next queue notification.
  bool RequestStats();
  std::optional<BalloonStats> GetStats() const;

  // Starts a hinting session: new cmd_id (>= 2) in the config space + config change. Hints are
  // delivered to `sink` until Stop/Finish or the next Start. Error if hinting was not offered.
  absl::StatusOr<uint32_t> StartFreePageHinting(FreePageHintSink* sink);
  // cmd_id = STOP: the guest stops hinting (it keeps the hinted pages until Finish).
  void StopFreePageHinting();
  // cmd_id = DONE: the guest frees the hinted pages again.
  void FinishFreePageHinting();
  uint32_t free_page_hint_cmd_id() const;

  // Counters.
  uint64_t bytes_reported() const;  // free page reporting: bytes discarded
  uint64_t bytes_hinted() const;    // free page hinting: bytes passed to a sink
  uint64_t ignored_pfns() const;    // inflate/deflate PFNs outside RAM or not inflated

  // The queue index serving `role` after Activate() (-1: none). For tests and logs.
  int queue_index(Role role) const;

 private:
  VirtioBalloon(GuestMemory* mem, EventLoop* loop, const VirtioBalloonOptions& options);

  // Bitmap of inflated pages, one per RAM region.
  struct RegionBits {
    uint64_t gpa = 0, pages = 0;
    std::vector<uint64_t> bits;
  };
  RegionBits* FindBitsLocked(uint64_t gpa);
  const RegionBits* FindBitsLocked(uint64_t gpa) const;
  bool TestSetLocked(uint64_t gpa, bool value);  // returns the old bit
  void ClearInflatedLocked();

  // Chain handlers; each returns the chain to the driver unless it keeps it (stats).
  void HandleChainLocked(Role role, DescriptorChain& chain);
  void HandleInflateLocked(const DescriptorChain& chain, bool inflate);
  void HandleStatsLocked(const DescriptorChain& chain);
  void HandleReportLocked(const DescriptorChain& chain);
  void HandleHintLocked(const DescriptorChain& chain);
  void DrainLocked(Role role);
  void ReturnLocked(Role role, uint16_t head);
  bool ReturnStatsBufferLocked();
  void FlushPendingLocked();  // deferred signals / stats request after quiesce or restore
  void OnTimer();

  GuestMemory* const mem_;
  EventLoop* const loop_;
  const VirtioBalloonOptions options_;
  const uint64_t features_;
  const uint32_t num_queues_;
  ScopedFd timer_;

  mutable std::mutex mu_;
  // Config space.
  uint32_t num_pages_ = 0, actual_ = 0, cmd_id_ = kBalloonCmdIdStop, poison_val_ = 0;
  // Run state.
  bool active_ = false;
  uint64_t negotiated_ = 0;
  QueueSignal signal_;
  std::array<Virtqueue*, kNumRoles> queue_{};
  std::array<int, kNumRoles> index_{-1, -1, -1, -1, -1};
  std::vector<int> role_of_index_;  // queue index -> Role or -1
  std::vector<bool> signal_pending_;
  bool quiesced_ = false;
  bool stats_request_pending_ = false;
  // Stats.
  std::optional<uint16_t> stats_head_;  // held stats buffer
  std::optional<uint16_t> restored_stats_head_;
  std::array<std::optional<uint64_t>, kBalloonStatTags> stats_{};
  absl::Time stats_time_ = absl::InfinitePast();
  // Free page hinting.
  FreePageHintSink* sink_ = nullptr;
  uint32_t guest_cmd_id_ = kBalloonCmdIdStop;  // id of the guest's current hinting run
  uint32_t next_cmd_id_ = kBalloonCmdIdFirst;
  // Inflated pages.
  std::vector<RegionBits> inflated_;
  uint64_t inflated_count_ = 0;
  // Counters.
  uint64_t bytes_reported_ = 0, bytes_hinted_ = 0, ignored_pfns_ = 0;
};

}  // namespace microvmm::virtio

#endif  // MICROVMM_DEVICES_VIRTIO_BALLOON_BALLOON_H_
