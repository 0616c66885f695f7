// SPDX-License-Identifier: MIT OR Apache-2.0
//! AMD SVM, the second CPU backend (issue 24): so far only its feature probe, so that a
//! machine without VT-x says what AMD virtualization it offers when it refuses. The world
//! switch (VMCB, VMRUN, nested page tables) comes behind the vCPU interface. May call
//! `arch` (CPUID, MSRs) and nothing above it.

pub mod features;
