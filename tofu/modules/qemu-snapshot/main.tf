# A QemuVMSnapshot (one snapshot of every disk of a VM of this project, taken once) or a
# QemuVMRestore (the VM's disks reverted to one, once), stored as the `input` of a
# terraform_data resource like a QemuVM (docs/snapshots.md). Removing a snapshot deletes its data.

terraform {
  required_version = ">= 1.6.0"
}

variable "name" {
  description = "metadata.name: 1-63 lowercase letters, digits, '-' and '.'."
  type        = string
  nullable    = false

  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$", var.name))
    error_message = "name ${jsonencode(var.name)} must be 1-63 lowercase letters, digits, '-' and '.', starting and ending with a letter or digit."
  }
}

variable "kind" {
  description = "QemuVMSnapshot (the default) or QemuVMRestore."
  type        = string
  default     = "QemuVMSnapshot"

  validation {
    condition     = contains(["QemuVMSnapshot", "QemuVMRestore"], var.kind)
    error_message = "kind must be QemuVMSnapshot or QemuVMRestore."
  }
}

variable "vm" {
  description = "The QemuVM's name: the snapshot's source, or the restore's target."
  type        = string
  nullable    = false
}

variable "snapshot" {
  description = "QemuVMRestore only: the QemuVMSnapshot to restore."
  type        = string
  default     = null

  validation {
    condition     = (var.snapshot != null) == (var.kind == "QemuVMRestore")
    error_message = "A QemuVMRestore names its snapshot; a QemuVMSnapshot does not."
  }
}

variable "labels" {
  description = "metadata.labels."
  type        = map(string)
  default     = {}
  nullable    = false
}

resource "terraform_data" "object" {
  input = {
    apiVersion = "tofu-qemu.dev/v1alpha1"
    kind       = var.kind
    metadata   = { name = var.name, labels = var.labels }
    spec = {
      QemuVMSnapshot = { source = { name = var.vm } }
      QemuVMRestore  = { target = { name = var.vm }, snapshot = var.snapshot }
    }[var.kind]
  }
}

output "name" {
  description = "The object's name (a restore's `snapshot` names a snapshot by it)."
  value       = var.name
}
