// Free-page hinting (VIRTIO_BALLOON_F_FREE_PAGE_HINT) as seen by its consumer, the live-migration
// code. The migration source starts a hinting session on the balloon
// (VirtioBalloon::StartFreePageHinting), the guest then takes blocks of free memory out of its
// allocator, keeps them allocated (unused) and tells the device their addresses. While the
// session lasts those pages hold nothing the guest needs, so the migration code may drop them
// from the set of pages it still has to send (clear their dirty bits). Pages written after the
// hint are caught by the dirty log as usual. The guest gets the pages back when the device sets
// the command id to DONE (FinishFreePageHinting) or starts a new session.
#ifndef MICROVMM_DEVICES_VIRTIO_BALLOON_FREE_PAGE_HINTS_H_
#define MICROVMM_DEVICES_VIRTIO_BALLOON_FREE_PAGE_HINTS_H_

#include <cstdint>

namespace microvmm::virtio {

// Config-space command ids (virtio spec "Free Page Hinting"; uapi VIRTIO_BALLOON_CMD_ID_*).
inline constexpr uint32_t kBalloonCmdIdStop = 0;
inline constexpr uint32_t kBalloonCmdIdDone = 1;
inline constexpr uint32_t kBalloonCmdIdFirst = 2;  // first id of a real session

// Receives the hints of one session. Called from the balloon's queue processing (a vCPU thread or
// the EventLoop thread) with the balloon's lock held: implementations must be quick, thread-safe
// with respect to the caller of StartFreePageHinting, and must not call back into the balloon.
// After StopFreePageHinting()/FinishFreePageHinting() returns, the sink is never called again.
class FreePageHintSink {
 public:
  virtual ~FreePageHintSink() = default;
  // [gpa, gpa + len) was free in the guest (page-aligned, non-empty, inside one guest RAM
  // region) for the current session. The device never reads or writes those pages.
  virtual void OnHintRangeFree(uint64_t gpa, uint64_t len) = 0;
  // The guest finished walking its free lists for `cmd_id` (it sent VIRTIO_BALLOON_CMD_ID_STOP):
  // no more hints will come for this session.
  virtual void OnHintingDone(uint32_t cmd_id) { (void)cmd_id; }
};

}  // namespace microvmm::virtio

#endif  // MICROVMM_DEVICES_VIRTIO_BALLOON_FREE_PAGE_HINTS_H_
