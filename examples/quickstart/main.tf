# The smallest tofu-qemu setup: one VM, stored in the tofu-qemu state backend.
# The backend address and credentials come from TF_HTTP_* environment variables (README.md).

terraform {
  required_version = ">= 1.6.0"

  backend "http" {}
}

variable "memory" {
  description = "Memory of the hello VM, in MiB."
  type        = number
  default     = 256
}

module "hello" {
  source = "../../tofu/modules/qemu-vm"

  name    = "hello"
  cpus    = 1
  memory  = var.memory
  machine = "q35"
  # Files in the server's images dir, built by the guest-image script.
  kernel = "tiny-guest/vmlinuz"
  initrd = "tiny-guest/initramfs.cpio.gz"
  # Guest port 80; the server allocates the host port.
  forwards = [{ protocol = "tcp", guest_port = 80 }]
}

output "manifest" {
  description = "The QemuVM manifest the server reads from the state."
  value       = module.hello.manifest
}
