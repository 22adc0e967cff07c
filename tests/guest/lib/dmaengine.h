/* The vfio-user test device's DMA engine (tests/vfio/user/test_server/test_device.h, PCI
 * 1234:11f0) as its guest drivers (vfiodma, vfiomig) see it: BAR0 registers, 64-bit each. */
#ifndef MICROVMM_TESTS_GUEST_LIB_DMAENGINE_H_
#define MICROVMM_TESTS_GUEST_LIB_DMAENGINE_H_

#define DMAENGINE_VENDOR 0x1234
#define DMAENGINE_DEVICE 0x11f0
#define REG_SRC 0x00
#define REG_DST 0x08
#define REG_LEN 0x10
#define REG_OP 0x18
#define REG_PATTERN 0x20
#define REG_DOORBELL 0x28 /* any write starts the DMA */
#define REG_STATUS 0x30
#define REG_COMPLETED 0x38 /* DMAs completed successfully */
#define REG_SCRATCH 0x40
#define OP_COPY 0
#define OP_FILL 1
#define STATUS_DONE 1
#define STATUS_ERROR 2

#endif /* MICROVMM_TESTS_GUEST_LIB_DMAENGINE_H_ */
