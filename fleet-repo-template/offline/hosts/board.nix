# The x86_64 board (devices with `config = "board"` in fleet.toml).
{
  hostName = "board";
  board = "x86-board";
  release = "24.11";
  motd = "reup fleet: x86 board";
  libsensor = "2.1";
  sensord = { version = "1.4.0"; interval = 10; sensors = [ "temp" "power" ]; };
}
